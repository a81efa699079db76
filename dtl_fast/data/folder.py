"""MultiModalFolder: paired image + video samples from a class-per-folder layout on disk.

    root/<split>/<class>/<stem>.png          the image (.png .jpg .jpeg .bmp .gif .webp)
    root/<split>/<class>/<stem>/             the video: a folder of frame images (natural order)
    root/<split>/<class>/<stem>.mp4          ... or an .mp4 file (decoded with PyAV, optional)

Every sample is decoded once when the dataset is built, so a missing, corrupt or truncated
file is reported with its path before training starts instead of in the middle of an epoch.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from dtl_fast.data.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ReadError,
    as_size,
    check_image,
    check_video,
    natural_key,
    read_image,
    read_video,
)

SPLITS = ("train", "validation", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_BAD_SAMPLE = ("error", "skip")

_MAX_LISTED = 20


class BadSampleError(RuntimeError):
    """Samples that cannot be read. `.bad` is the list of (path, reason); the message names
    every path (the first 20, then how many more) and why."""

    def __init__(self, bad: Sequence[tuple[str, str]], where=None):
        self.bad = [(str(p), str(r)) for p, r in bad]
        self.where = None if where is None else str(where)
        n = len(self.bad)
        head = f"{n} bad sample{'s' if n != 1 else ''}" + (f" in {self.where}" if self.where else "")
        lines = [f"  {p}: {r}" for p, r in self.bad[:_MAX_LISTED]]
        if n > _MAX_LISTED:
            lines.append(f"  ... and {n - _MAX_LISTED} more")
        hint = ("\n(fix or remove these files, or pass on_bad_sample='skip' / --on-bad-sample skip "
                "to leave them out)")
        super().__init__(head + ":\n" + "\n".join(lines) + hint)

    def __reduce__(self):  # keeps the exception picklable across DataLoader worker processes
        return (type(self), (self.bad, self.where))


def _check_stats(value, name: str, channels: int, positive: bool) -> torch.Tensor:
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

    A sample is bad when its image or video is missing, unreadable or corrupt, its frame folder
    holds no frame, or its stem is ambiguous (two images, or an .mp4 and a frame folder). Files
    that are neither images, .mp4 nor folders are ignored, as are hidden files.

    Attributes: classes (list[str]), class_to_idx (dict[str, int]), samples (list of
    (image_path, video_path, label)), skipped (list of (path, reason)), num_frames (list[int],
    each clip's frame count on disk, before subsampling).

    dataset[i] -> (image float32 [C, H, W], video float32 [T, C, H', W'] with
    1 <= T <= max_frames, label int).
    """

    def __init__(self, root, split: str = "train", *, image_size=32, frame_size=None, max_frames=16,
                 channels: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=None,
                 on_bad_sample: str = "error"):
        if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ValueError(f"split must be the name of a folder under root (e.g. one of {SPLITS}), got {split!r}")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = as_size(image_size, "image_size")
        self.frame_size = self.image_size if frame_size is None else as_size(frame_size, "frame_size")
        self.max_frames = max_frames
        self.channels = channels
        self.mean = _check_stats(mean, "mean", channels, positive=False)
        self.std = _check_stats(std, "std", channels, positive=True)
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
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data root {self.root} does not exist or is not a folder")
        if not os.path.isdir(split_dir):
            found = sorted(n for n in os.listdir(self.root)
                           if not n.startswith(".") and os.path.isdir(os.path.join(self.root, n)))
            raise FileNotFoundError(f"split folder {split_dir} does not exist (split={split!r}); folders "
                                    f"under {self.root}: {found or 'none'}")
        folders = sorted(n for n in os.listdir(split_dir)
                         if not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n)))
        if not folders:
            raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<sample>.png "
                             f"with <sample>.mp4 or a folder <sample>/ of frames beside it")
        if classes is None:
            self.classes = folders
        else:
            unknown = [f for f in folders if f not in classes]
            if unknown:
                raise ValueError(f"class folder(s) {unknown} in {split_dir} are not in classes="
                                 f"{list(classes)}")
            self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        candidates, bad = [], []
        for name in folders:
            found, problems = _scan_class_folder(os.path.join(split_dir, name), self.class_to_idx[name])
            candidates += found
            bad += problems
        if not candidates and not bad:
            raise ValueError(f"no samples in {split_dir}: expected {split_dir}/<class>/<sample>.png with "
                             f"<sample>.mp4 or a folder <sample>/ of frames beside it")

        # Decoding is mostly zlib/libjpeg work that releases the GIL, so threads help.
        workers = min(8, (os.cpu_count() or 1) + 1, max(1, len(candidates) // 64))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_check_sample, candidates, chunksize=1))
        self.samples, self.num_frames = [], []
        for sample, result in zip(candidates, results):
            if isinstance(result, ReadError):
                bad.append((result.path, result.reason))
            else:
                self.samples.append(sample)
                self.num_frames.append(result)
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, video_path, label = self.samples[index]
        try:
            image = read_image(image_path, self.image_size, self.mean, self.std, self._mode)
            video = read_video(video_path, self.frame_size, self.mean, self.std, self._mode, self.max_frames)
        except ReadError as exc:  # the file changed after the check at construction
            raise BadSampleError([(exc.path, exc.reason)], os.path.join(self.root, self.split)) from exc
        return image, video, label

    def __repr__(self) -> str:
        return (f"MultiModalFolder({self.root!r}, split={self.split!r}, {len(self)} samples, "
                f"{len(self.classes)} classes, image_size={self.image_size}, frame_size={self.frame_size}, "
                f"max_frames={self.max_frames}, channels={self.channels}"
                + (f", skipped={len(self.skipped)}" if self.skipped else "") + ")")


def _scan_class_folder(folder: str, label: int):
    """Pairs images with videos by stem. Returns ([(image, video, label)], [(path, reason)])."""
    images: dict[str, list[str]] = {}
    videos: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                videos.setdefault(entry.name, []).append(entry.path)
                continue
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS:
                images.setdefault(stem, []).append(entry.path)
            elif ext in VIDEO_EXTENSIONS:
                videos.setdefault(stem, []).append(entry.path)
    found, bad = [], []
    for stem in sorted(set(images) | set(videos), key=natural_key):
        imgs, vids = sorted(images.get(stem, [])), sorted(videos.get(stem, []))
        if len(imgs) > 1:
            bad.append((imgs[0], f"several images share the stem {stem!r}: "
                                 f"{', '.join(os.path.basename(p) for p in imgs)}"))
        elif len(vids) > 1:
            bad.append((vids[0], f"both {stem}.mp4 and a frame folder {stem}/ exist; keep one"))
        elif not imgs:
            bad.append((vids[0], f"a video with no image of the same stem (expected {stem}.png, .jpg, ...)"))
        elif not vids:
            bad.append((imgs[0], f"no video for this image (expected {os.path.join(folder, stem)}.mp4 "
                                 f"or a folder {os.path.join(folder, stem)}/ of frames)"))
        else:
            found.append((imgs[0], vids[0], label))
    return found, bad


def _check_sample(sample):
    """Decodes a sample's image and every frame of its video once: the frame count, or the
    ReadError (RuntimeError for a missing optional dependency propagates: it is not the data's
    fault and skipping every .mp4 would be a silent loss)."""
    image_path, video_path, _ = sample
    try:
        check_image(image_path)
        return check_video(video_path)
    except ReadError as exc:
        return exc


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
