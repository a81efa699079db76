"""MultiModalFolder: paired image + video samples from a class-per-folder layout on disk.

    root/<split>/<class>/<stem>.png     the image (.png .jpg .jpeg .bmp .gif .webp)
    root/<split>/<class>/<stem>/        the video: a folder of frame images (natural order)
    root/<split>/<class>/<stem>.mp4     ... or a video file: .mp4 .m4v .mov .avi .mkv .webm
                                        (any codec FFmpeg decodes; read with PyAV)
    root/<split>/<class>/<stem>.gif     ... or an animated .gif beside a still image of the stem

Every sample is decoded once (every frame) when the data set is first built, so a file that is
missing, cannot be opened or decoded (a truncated image or frame; a video file's undecodable
bytes), holds no frame, or is a video file cut off before the end its container records (an
.avi's RIFF chunks, a Matroska / WebM Segment, the top-level boxes of .mp4 / .m4v / .mov: an
interrupted copy or download) is reported with its path before training starts instead of in
the middle of an epoch. Damage the decoder conceals (bytes changed inside a clip) can pass, and
so can a cut that falls exactly between two of those top-level parts (or inside the 8-byte
header that opens the last one); a Matroska file written as a live stream, or an .avi whose
writer could not seek back (a pipe: FFmpeg's placeholder size), records no end to compare with. The check runs in threads, or in `workers` processes, with an optional progress
bar, and its verdicts are remembered in a manifest in the cache (see
dtl_fast.data.manifest): the next construction decodes only the samples whose files changed.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from dtl_fast.data.manifest import Manifest, sample_stamp
from dtl_fast.data.video import (
    ANIMATED_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ReadError,
    as_size,
    check_image,
    check_video,
    import_pillow,
    natural_key,
    read_image,
    read_video,
)

SPLITS = ("train", "validation", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_BAD_SAMPLE = ("error", "skip")

_MAX_LISTED = 20
# folders that archivers and operating systems leave behind: never a class (nor are hidden ones)
_NOT_CLASSES = ("__MACOSX",)


def class_folder_names(split_dir: str) -> list[str]:
    """The class folders of a split, sorted: its sub-folders, except hidden ones (a name that
    starts with '.') and archiver junk such as __MACOSX/ (what a zip made on macOS holds)."""
    return sorted(n for n in os.listdir(split_dir)
                  if not n.startswith(".") and n not in _NOT_CLASSES
                  and os.path.isdir(os.path.join(split_dir, n)))


def empty_class_folders(split_dir: str, names) -> list[str]:
    """Those of the class folders `names` of a split that hold no sample at all (no image or
    clip file, not even a bad one; hidden files do not count): what MultiModalFolder refuses
    as a class when it lists the classes itself (classes=None)."""
    return [n for n in names if _scan_class_folder(os.path.join(split_dir, n), 0) == ([], [])]


def empty_class_error(split_dir: str, names) -> ValueError:
    """The error for class folders `names` of a split that hold no sample, when the classes are
    the split's own folders (classes=None): a class with no samples would still be a class of
    the model (an output no sample ever trains or tests), almost always a stray or unfinished
    folder. Raised alike for a raw and a prepared split."""
    paths = [os.path.join(split_dir, n) for n in names]
    return ValueError(f"no samples in the class folder{'s' if len(paths) > 1 else ''} "
                      f"{', '.join(paths[:_MAX_LISTED])}"
                      + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")
                      + f": every folder under {split_dir} is a class, so remove "
                      f"{'these' if len(paths) > 1 else 'it'} (or add samples: <sample>.png with "
                      "<sample>.mp4, another video file or a folder <sample>/ of frames beside it)")


class BadSampleError(RuntimeError):
    """Samples that cannot be read. `.bad` is the list of (path, reason); the message names
    every path (the first 20, then how many more) and why. `.where` is the split folder (or
    None).

    Raised in a DataLoader worker process, it reaches the main process as a BadSampleError too:
    PyTorch rebuilds the exception there as BadSampleError(text), text being "Caught
    BadSampleError in DataLoader worker process N. Original Traceback ...". Given such a string,
    the message is the worker's original one (without the worker's traceback, which is kept in
    `.worker_traceback`), and `.where` / `.bad` are read back from it (a path that contains
    ": " may be split at the wrong place there; the message itself is exact).
    """

    def __init__(self, bad: Sequence[tuple[str, str]] | str, where=None):
        self.worker_traceback = None
        if isinstance(bad, str):  # PyTorch's worker re-raise: exc_type(message)
            message, self.where, self.bad, self.worker_traceback = _parse_bad_sample_message(bad)
            if where is not None:
                self.where = str(where)
            super().__init__(message)
            return
        self.bad = [(str(p), str(r)) for p, r in bad]
        self.where = None if where is None else str(where)
        n = len(self.bad)
        head = f"{n} bad sample{'s' if n != 1 else ''}" + (f" in {self.where}" if self.where else "")
        lines = [f"  {p}: {r}" for p, r in self.bad[:_MAX_LISTED]]
        if n > _MAX_LISTED:
            lines.append(f"  ... and {n - _MAX_LISTED} more")
        super().__init__(head + ":\n" + "\n".join(lines) + _BAD_SAMPLE_HINT)

    def __reduce__(self):  # keeps the exception picklable across DataLoader worker processes
        if self.worker_traceback is not None:
            return (type(self), (self.worker_traceback, self.where))
        return (type(self), (self.bad, self.where))


_BAD_SAMPLE_HINT = ("\n(fix or remove these files, or pass on_bad_sample='skip' / --on-bad-sample skip "
                    "to leave them out)")


def _parse_bad_sample_message(text: str):
    """(message, where, bad, worker traceback or None) from the text PyTorch's ExceptionWrapper
    builds for a BadSampleError raised in a worker, or from a bare BadSampleError message."""
    traceback_text = None
    # the formatted worker traceback ends with "<module>.BadSampleError: <our message>"; a
    # chained cause (`raise ... from exc`) comes before it, so the last such line is ours
    marker = f"{__name__}.BadSampleError: "
    at = text.rfind("\n" + marker)
    if at >= 0:
        traceback_text, message = text, text[at + 1 + len(marker):].rstrip("\n")
    else:
        message = text
    head, _, rest = message.partition("\n")
    where = None
    if head.endswith(":") and " bad sample" in head and " in " in head:
        where = head[:-1].split(" in ", 1)[1]
    bad = []
    for line in rest.split("\n"):
        if not line.startswith("  ") or line.startswith("  ... and "):
            continue
        body = line[2:]
        # the path normally lies under `where`: split at the first ": " after that prefix
        start = len(where) if where and body.startswith(where) else 0
        cut = body.find(": ", start)
        if cut > 0:
            bad.append((body[:cut], body[cut + 2:]))
    return message, where, bad, traceback_text


def check_stats(value, name: str, channels: int, positive: bool) -> torch.Tensor:
    """A mean / std argument -> float32 [channels, 1, 1]; ValueError naming `name` unless it is
    `channels` finite numbers (positive ones for a std), or 3 averaged into 1 for channels=1."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of {channels} numbers, got {value!r}")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if channels == 1 and len(numbers) == 3:
        numbers = [sum(numbers) / 3.0]  # one gray channel: the average of the RGB statistics
    if len(numbers) != channels:
        raise ValueError(f"{name} must have {channels} entries (one per channel"
                         f"{'; or 3, averaged' if channels == 1 else ''}), got {len(numbers)}: {value!r}")
    if not all(math.isfinite(v) for v in numbers) or (positive and min(numbers) <= 0):
        raise ValueError(f"{name} must hold finite{' positive' if positive else ''} numbers, got {value!r}")
    return torch.tensor(numbers, dtype=torch.float32).view(channels, 1, 1)


def check_decode_options(on_bad_sample: str, max_frames, channels: int) -> None:
    """ValueError naming the argument unless on_bad_sample is "error" / "skip", max_frames None
    or an int >= 1 and channels 1 or 3 (MultiModalFolder's and `prepare`'s shared options)."""
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


class MultiModalFolder(Dataset):
    """Image + video classification samples read from `root/<split>/<class>/`.

    Args:
        root: the data set folder (holding train/, validation/, test/ or other split folders).
        split: the split folder's name.
        image_size: int or (H, W): images are resized (bilinear) to this size.
        frame_size: int or (H, W) for video frames; None: the same as image_size.
        max_frames: clips longer than this are subsampled uniformly to max_frames frames (the
            i-th kept frame is floor((i + 0.5) * T / max_frames)); None keeps every frame.
        channels: 3 (files are converted to RGB, grayscale included) or 1 (converted to gray).
        mean, std: per-channel normalisation, x = (pixel / 255 - mean) / std. With channels=1, a
            3-entry mean/std (ImageNet's by default) is replaced by the average of its entries.
        classes: the class names, in label order. None: the sorted class-folder names of this
            split. Pass the training split's `.classes` so validation/test use the same labels;
            a class folder missing from the list is a ValueError naming it.
        on_bad_sample: "error" raises BadSampleError listing every bad path when the dataset is
            built; "skip" leaves those samples out, warns once and lists them in `.skipped`.
        workers: 0 checks the samples in a thread pool in this process; N > 0 in N worker
            processes (faster for video files on several cores; the multiprocessing start
            method is Python's default, as for a DataLoader, so under "spawn" the calling script
            needs an `if __name__ == "__main__":` guard).
        progress: True shows a tqdm progress bar of the samples checked on stderr (redrawn at
            most every 30 s when stderr is not a terminal, so logs stay short).
        manifest: True remembers each sample's verdict and file stamps (size, mtime) in
            $DTL_FAST_CACHE/manifests (else ~/.cache/dtl_fast/manifests), never in the data
            folder; the next construction decodes only new or changed samples. False checks
            everything and writes nothing.

    Which file is the clip: a folder <stem>/ of frame images, a video file <stem>.mp4 (.m4v .mov
    .avi .mkv .webm, any case), or a <stem>.gif when the stem also has a still image (a.png +
    a.gif: a.gif is the clip; a.gif alone, or beside a video, is the image).

    A sample is bad when its image or video is missing, unreadable or corrupt, the video file
    has no video stream or no frame or is cut off (shorter than its container records), its
    frame folder holds no frame, or its stem is ambiguous (two images, or two clips such as
    a.mp4 + a.webm or a.avi + a folder a/: the reason names both). Other files are ignored, as
    are hidden files.

    Every sub-folder of a split is a class, except hidden ones (a name starting with '.') and
    __MACOSX/. With classes=None a class folder with no sample in it is a ValueError naming it
    (it would be a class no sample teaches; remove it); with classes given it is a class of the
    list with no sample in this split, as if the folder were absent. A class whose every sample
    is skipped (on_bad_sample="skip") stays a class, with a warning naming it.

    Attributes: classes (list[str]), class_to_idx (dict[str, int]), samples (list of
    (image_path, video_path, label)), skipped (list of (path, reason)), num_frames (list[int],
    each clip's frame count on disk, before subsampling).

    Sample order: class folders in sorted order, and within each the stems in natural order
    (video.natural_key: digit runs by value, text without regard to case, ties such as "A1" /
    "a1" by the raw name). It depends only on the names, never on the file system's listing
    order or on PYTHONHASHSEED, so every process (each rank of a torchrun job, a resumed run)
    sees the same samples at the same indices.

    dataset[i] -> (image float32 [C, H, W], video float32 [T, C, H', W'] with
    1 <= T <= max_frames, label int).
    """

    def __init__(self, root, split: str = "train", *, image_size=32, frame_size=None, max_frames=16,
                 channels: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=None,
                 on_bad_sample: str = "error", workers: int = 0, progress: bool = False,
                 manifest: bool = True):
        if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ValueError(f"split must be the name of a folder under root (e.g. one of {SPLITS}), got {split!r}")
        check_decode_options(on_bad_sample, max_frames, channels)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0: threads in this process), got {workers!r}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be True or False, got {progress!r}")
        if not isinstance(manifest, bool):
            raise ValueError(f"manifest must be True or False, got {manifest!r}")
        self.image_size = as_size(image_size, "image_size")
        self.frame_size = self.image_size if frame_size is None else as_size(frame_size, "frame_size")
        self.max_frames = max_frames
        self.channels = channels
        self.mean = check_stats(mean, "mean", channels, positive=False)
        self.std = check_stats(std, "std", channels, positive=True)
        self._mode = "RGB" if channels == 3 else "L"
        if classes is not None:
            if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
                raise ValueError(f"classes must be None or a non-empty list of class names, got {classes!r}")
            if not all(isinstance(c, str) and c for c in classes):
                raise ValueError(f"classes must hold non-empty strings, got {classes!r}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes holds a name twice: {classes!r}")

        self.root = os.fspath(root)
        self.split = split
        self.on_bad_sample = on_bad_sample
        split_dir = os.path.join(self.root, split)
        # every sample has an image: without Pillow, say so now, not at the first batch (a
        # manifest's remembered verdicts would let the check pass without decoding one)
        import_pillow(split_dir, "the images of")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data root {self.root} does not exist or is not a folder")
        if not os.path.isdir(split_dir):
            found = sorted(n for n in os.listdir(self.root)
                           if not n.startswith(".") and os.path.isdir(os.path.join(self.root, n)))
            raise FileNotFoundError(f"split folder {split_dir} does not exist (split={split!r}); folders "
                                    f"under {self.root}: {found or 'none'}")
        folders = class_folder_names(split_dir)
        if not folders:
            raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<sample>.png "
                             f"with <sample>.mp4 (or another video file) or a folder <sample>/ of frames "
                             "beside it")
        if classes is None:
            self.classes = folders
        else:
            unknown = [f for f in folders if f not in classes]
            if unknown:
                raise ValueError(f"class folder(s) {unknown} in {split_dir} are not in classes="
                                 f"{list(classes)}")
            self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        candidates, bad, empty = [], [], []
        for name in folders:
            found, problems = _scan_class_folder(os.path.join(split_dir, name), self.class_to_idx[name])
            candidates += found
            bad += problems
            if not found and not problems and classes is None:
                empty.append(name)  # with classes given, it is a known class with no sample here
        if not candidates and not bad:
            raise ValueError(f"no samples in {split_dir}: expected {split_dir}/<class>/<sample>.png with "
                             f"<sample>.mp4 (or another video file) or a folder <sample>/ of frames beside it")
        if empty:
            raise empty_class_error(split_dir, empty)

        verdicts = _check_all(split_dir, candidates, workers, progress, manifest)
        self.samples, self.num_frames = [], []
        for sample, verdict in zip(candidates, verdicts):
            if verdict[0] == "bad":
                bad.append((verdict[1], verdict[2]))
            else:
                self.samples.append(sample)
                self.num_frames.append(verdict[1])
        bad.sort(key=lambda pr: natural_key(pr[0]))
        self.skipped: list[tuple[str, str]] = []
        if bad and on_bad_sample == "error":
            raise BadSampleError(bad, split_dir)
        if bad:
            self.skipped = bad
            if not self.samples:
                raise BadSampleError(bad, f"{split_dir} (every sample is bad, nothing left to use)")
            warnings.warn(f"MultiModalFolder: skipped {len(bad)} bad sample(s) in {split_dir} "
                          f"(listed in .skipped), e.g. {bad[0][0]}: {bad[0][1]}", stacklevel=2)
            kept = {label for _, _, label in self.samples}
            gone = [name for name in folders if self.class_to_idx[name] not in kept]
            if gone:
                warnings.warn(f"MultiModalFolder: every sample of class folder(s) "
                              f"{', '.join(os.path.join(split_dir, n) for n in gone)} is bad and was "
                              f"skipped: {'these stay classes' if len(gone) > 1 else 'it stays a class'} "
                              f"with no {split} sample", stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, video_path, label = self.samples[index]
        try:
            image = read_image(image_path, self.image_size, self.mean, self.std, self._mode)
            # the check's frame count: a video file is decoded once, keeping only the frames used
            # (none when a caller edited .samples alone: then it is counted again)
            total = self.num_frames[index] if len(self.num_frames) == len(self.samples) else None
            video = read_video(video_path, self.frame_size, self.mean, self.std, self._mode, self.max_frames,
                               total)
        except ReadError as exc:  # the file changed after the check at construction
            raise BadSampleError([(exc.path, exc.reason)], os.path.join(self.root, self.split)) from exc
        return image, video, label

    def __repr__(self) -> str:
        return (f"MultiModalFolder({self.root!r}, split={self.split!r}, {len(self)} samples, "
                f"{len(self.classes)} classes, image_size={self.image_size}, frame_size={self.frame_size}, "
                f"max_frames={self.max_frames}, channels={self.channels}"
                + (f", skipped={len(self.skipped)}" if self.skipped else "") + ")")


_VIDEO_HINT = " ".join(VIDEO_EXTENSIONS[1:])  # ".m4v .mov .avi .mkv .webm"


def _scan_class_folder(folder: str, label: int):
    """Pairs images with clips by stem (the rule is in MultiModalFolder's docstring).
    Returns ([(image, video, label)], [(path, reason)])."""
    stills: dict[str, list[str]] = {}
    animated: dict[str, list[str]] = {}
    clips: dict[str, list[str]] = {}
    folders = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                clips.setdefault(entry.name, []).append(entry.path)
                folders.add(entry.path)
                continue
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext in ANIMATED_EXTENSIONS:
                animated.setdefault(stem, []).append(entry.path)
            elif ext in IMAGE_EXTENSIONS:
                stills.setdefault(stem, []).append(entry.path)
            elif ext in VIDEO_EXTENSIONS:
                clips.setdefault(stem, []).append(entry.path)

    def name(path):
        return os.path.basename(path) + ("/" if path in folders else "")

    found, bad = [], []
    for stem in sorted(set(stills) | set(animated) | set(clips), key=natural_key):
        gifs = animated.get(stem, [])
        if stem in stills:  # a .gif beside a still image is the clip
            imgs, vids = sorted(stills[stem]), sorted(clips.get(stem, []) + gifs)
        else:               # a .gif alone, or beside a video, is the image
            imgs, vids = sorted(gifs), sorted(clips.get(stem, []))
        base = os.path.join(folder, stem)
        if len(imgs) > 1:
            bad.append((imgs[0], f"several images share the stem {stem!r}: "
                                 f"{', '.join(name(p) for p in imgs)}"))
        elif len(vids) > 1:
            bad.append((vids[0], f"several clips share the stem {stem!r}: {', '.join(name(p) for p in vids)}; "
                                 "keep one (a .gif beside a still image counts as a clip)"))
        elif not imgs:
            bad.append((vids[0], f"a video with no image of the same stem (expected {stem}.png, .jpg, ...)"))
        elif not vids:
            alone = (f" ({name(imgs[0])} alone is the image; put a still image beside it to use it as the clip)"
                     if gifs else "")
            bad.append((imgs[0], f"no video for this image (expected a video file {base}.mp4 (or {_VIDEO_HINT}), "
                                 f"an animated {stem}.gif beside the image, or a folder {base}/ of frames){alone}"))
        else:
            found.append((imgs[0], vids[0], label))
    return found, bad


def _check_sample(sample):
    """Decodes a sample's image and every frame of its video once: ("ok", frame count) or
    ("bad", path, reason). A RuntimeError for a missing optional dependency propagates: it is
    not the data's fault and skipping every video file would be a silent loss."""
    image_path, video_path, _ = sample
    try:
        check_image(image_path)
        return ("ok", check_video(video_path))
    except ReadError as exc:
        return ("bad", exc.path, exc.reason)


def _run_checks(samples: list, workers: int):
    """_check_sample over samples, results in order, in threads (workers=0) or processes."""
    if not samples:
        return
    if workers == 0:
        # Decoding is mostly zlib / libjpeg / libavcodec work that releases the GIL: threads help.
        threads = min(8, (os.cpu_count() or 1) + 1, max(1, len(samples) // 64))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield from pool.map(_check_sample, samples)
        return
    workers = min(workers, len(samples))
    # chunks amortise the pickling round trip yet stay small enough for an even spread and a
    # progress bar that moves; Executor.map cancels what is still queued if we stop early
    chunk = max(1, min(64, len(samples) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_check_sample, samples, chunksize=chunk)


def _stamp_chunk(samples: list) -> list:
    return [sample_stamp(image_path, video_path) for image_path, video_path, _ in samples]


def _stamp_all(candidates: list, chunk: int = 256) -> list:
    """sample_stamp of every candidate, in order; threads for many samples (stat and scandir
    release the GIL, and on a network file system each one waits on a round trip)."""
    if len(candidates) < 2 * chunk:
        return _stamp_chunk(candidates)
    parts = [candidates[i:i + chunk] for i in range(0, len(candidates), chunk)]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return [stamp for part in pool.map(_stamp_chunk, parts) for stamp in part]


def _check_all(split_dir: str, candidates: list, workers: int, progress: bool, use_manifest: bool) -> list:
    """The verdict of every candidate, in order: ("ok", frames) or ("bad", path, reason); taken
    from the manifest where the sample's files are unchanged, else decoded (and remembered)."""
    book = Manifest(split_dir) if use_manifest else None
    started = time.time_ns()  # before the stamps: a write after this is seen as a change
    verdicts, stamps, todo = [None] * len(candidates), [None] * len(candidates), []
    if book is not None:
        stamps = _stamp_all(candidates)
    for i, (image_path, video_path, _) in enumerate(candidates):
        if book is not None:
            verdicts[i] = book.lookup(image_path, video_path, stamps[i])
        if verdicts[i] is None:
            todo.append(i)
    bar = None
    if progress:
        from dtl_fast._progress import progress_bar  # tqdm, one line per interval in a log

        bar = progress_bar(len(candidates), f"checking {split_dir}", unit=" samples",
                           initial=len(candidates) - len(todo))
    try:
        for i, verdict in zip(todo, _run_checks([candidates[i] for i in todo], workers)):
            verdicts[i] = verdict
            if book is not None:
                book.record(candidates[i][0], candidates[i][1], stamps[i], started, verdict)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if book is not None:
            book.save()  # also when interrupted: the samples checked so far are not decoded again
    return verdicts


class MultiModalBatch(NamedTuple):
    """A padded batch: images float32 [B, C, H, W]; videos float32 [B, T_max, C, H', W'], zero
    past each clip's length; lengths int64 [B] (1 <= lengths <= T_max); labels int64 [B]."""

    images: torch.Tensor
    videos: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> MultiModalBatch:
        """Every tensor moved to `device` (dtypes kept)."""
        return MultiModalBatch(*(t.to(device, non_blocking=non_blocking) for t in self))


def collate_multimodal(samples) -> MultiModalBatch:
    """Batches MultiModalFolder samples (the DataLoader's collate_fn).

    samples: a non-empty list of (image float32 [C, H, W], video float32 [T_i, C, H', W'],
    label int). Returns MultiModalBatch with videos zero padded to T_max = max T_i.
    """
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError("collate_multimodal: samples must be a non-empty list of (image, video, label)")
    images, videos, labels = [], [], []
    for i, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) != 3:
            raise ValueError(f"collate_multimodal: samples[{i}] must be (image, video, label), got "
                             f"{type(sample).__name__}")
        image, video, label = sample
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"collate_multimodal: samples[{i}] image must be a [C, H, W] tensor")
        if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] < 1:
            raise ValueError(f"collate_multimodal: samples[{i}] video must be a [T, C, H, W] tensor with "
                             f"T >= 1, got shape {tuple(getattr(video, 'shape', ()))}")
        if images and image.shape != images[0].shape:
            raise ValueError(f"collate_multimodal: samples[{i}] image shape {tuple(image.shape)} differs from "
                             f"samples[0]'s {tuple(images[0].shape)}")
        if videos and video.shape[1:] != videos[0].shape[1:]:
            raise ValueError(f"collate_multimodal: samples[{i}] frame shape {tuple(video.shape[1:])} differs "
                             f"from samples[0]'s {tuple(videos[0].shape[1:])}")
        images.append(image)
        videos.append(video)
        labels.append(int(label))
    lengths = torch.tensor([v.shape[0] for v in videos], dtype=torch.int64)
    t_max = int(lengths.max())
    padded = videos[0].new_zeros((len(videos), t_max) + tuple(videos[0].shape[1:]))
    for b, video in enumerate(videos):
        padded[b, : video.shape[0]] = video
    return MultiModalBatch(torch.stack(images), padded, lengths, torch.tensor(labels, dtype=torch.int64))
