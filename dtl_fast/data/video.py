"""Reading images and clips from disk into uint8 pixels and normalised float32 tensors (Pillow,
PyAV and numpy; no torchvision).

A clip is one of:
- a folder of frame images, read in natural name order ("2.png" before "10.png"; `natural_key`);
- a video file in any container FFmpeg reads, decoded with PyAV (imported only when a video file
  is read): VIDEO_EXTENSIONS = .mp4 .m4v .mov .avi .mkv .webm; the first video stream is used
  (cover art attached to an audio file does not count as one);
- an animated .gif (or any multi-frame image Pillow reads), decoded frame by frame with Pillow.

`check_video` decodes every frame once and returns the count; `load_video_uint8` returns the
frames kept by `subsample_indices`, holding only those in memory while it decodes. Every failure
of the data (missing file, no video stream, undecodable bytes, no frame, a video file cut off
before the end its container records: `_declared_short`) is a ReadError with the reason; a
missing PyAV is a RuntimeError, because it is not the data's fault.
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")  # decoded with PyAV
ANIMATED_EXTENSIONS = (".gif",)  # a clip when it sits beside a still image of its stem (Pillow)


class ReadError(Exception):
    """A file could not be read or decoded; str(exc) is the reason (the path is kept apart so
    callers can report path and reason as a pair)."""

    def __init__(self, path, reason: str):
        super().__init__(reason)
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes (Exception's default drops path)
        return (type(self), (self.path, self.reason))


_DIGIT_RUNS = re.compile(r"([0-9]+)")  # ASCII digits only: int() takes what this matches


def natural_key(name: str):
    """Sort key that orders runs of ASCII digits by value and the text between them without
    regard to case: "f2.png" < "f10.png", "a.png" < "B.png". Names this leaves tied ("A1" and
    "a1", "01" and "1") are ordered by the raw name (code points: "A1" < "a1"), so the order is
    total and does not depend on the order the names came in (a set's order changes with
    PYTHONHASHSEED, a folder listing's with the file system). Any Unicode name sorts: "²" or
    "①" is text here (str.isdigit() says True for them, but int() refuses them)."""
    # re.split puts the captured digit runs at the odd indices
    parts = _DIGIT_RUNS.split(name)
    return ([(0, int(tok), tok) if i % 2 else (1, 0, tok.lower()) for i, tok in enumerate(parts) if tok],
            name)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def frame_files(folder) -> list[str]:
    """The frame images of a clip folder, full paths in natural order (hidden files and
    non-images ignored)."""
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise ReadError(folder, f"cannot list the frame folder: {exc.strerror or exc}") from exc
    names = [n for n in names if is_image_name(n) and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def subsample_indices(total: int, max_frames: int | None) -> list[int]:
    """Indices of the frames kept from a clip of `total` frames: all of them when total <=
    max_frames (or max_frames is None), else max_frames frames spread uniformly, the i-th being
    floor((i + 0.5) * total / max_frames) (the centre of the i-th of max_frames equal spans)."""
    if max_frames is None or total <= max_frames:
        return list(range(total))
    return [int((i + 0.5) * total / max_frames) for i in range(max_frames)]


def import_pillow(path, what: str = "the image"):
    """PIL.Image, or a RuntimeError that says how to install Pillow (reading `what` `path` needs
    it): not the data's fault, so not a ReadError (a missing PyAV is told the same way)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise RuntimeError(
            f"reading {what} {path} needs Pillow, which is not installed: pip install pillow "
            "(or pip install 'dtl-fast[train]')") from exc
    return Image


@contextlib.contextmanager
def _image_errors(path):
    """Turns Pillow's many ways of failing into one ReadError naming the path and why."""
    Image = import_pillow(path)
    UnidentifiedImageError = Image.UnidentifiedImageError

    try:
        yield
    except FileNotFoundError as exc:
        raise ReadError(path, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise ReadError(path, "not a readable image (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large to decode safely: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        # Pillow reports truncated data, bad CRCs and broken headers through all of these
        raise ReadError(path, f"corrupt or truncated image: {exc}") from exc


def open_image(path, mode: str):
    """Decodes an image file fully into a PIL image of `mode` ("RGB" or "L").

    Transparent pixels become black; 16-bit grayscale is rescaled to 8 bits. Raises ReadError
    with the reason for a missing, truncated or undecodable file.
    """
    Image = import_pillow(path)
    with _image_errors(path), Image.open(path) as im:
        im.load()  # decodes every byte now: a truncated file fails here, not later
        return _convert(im, mode)


def _convert(im, mode: str):
    """A decoded PIL image -> a new PIL image of `mode`: 16/32-bit gray rescaled to 8 bits,
    transparency composited on black."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # convert("L") would clip 16/32-bit values, so rescale to 8 bits first
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # composite on black: a transparent pixel's stored colour is arbitrary
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert(mode)


def check_image(path) -> None:
    """Decodes an image once (raises ReadError if it cannot be)."""
    Image = import_pillow(path)
    with _image_errors(path), Image.open(path) as im:
        im.load()


def _import_av(path):
    try:
        import av
    except ImportError as exc:
        raise RuntimeError(
            f"reading the video {path} needs PyAV, which is not installed: pip install av "
            "(or store each clip as a folder of frame images)") from exc
    return av


def is_video_file_name(name: str) -> bool:
    """True for a name PyAV decodes as a clip (VIDEO_EXTENSIONS, any case, not hidden)."""
    return not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS)


def _is_animated_name(path) -> bool:
    return os.fspath(path).lower().endswith(ANIMATED_EXTENSIONS)


@contextlib.contextmanager
def _video_errors(path):
    """Turns PyAV's ways of failing into one ReadError naming the path and why."""
    try:
        yield
    except ReadError:
        raise
    except FileNotFoundError as exc:
        raise ReadError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ReadError(path, "a folder, not a video file") from exc
    except Exception as exc:  # PyAV raises av.error.* (OSError/ValueError subclasses) and others
        raise ReadError(path, f"corrupt or undecodable video: {type(exc).__name__}: {exc}") from exc


def _decoded_frames(av, container, path):
    """The decoded av.VideoFrame objects of the container's first real video stream, in order."""
    attached = int(getattr(av.stream.Disposition, "attached_pic", 0))
    # an audio file's cover art is a one-picture "video" stream: not a clip
    streams = [s for s in container.streams.video if not int(s.disposition) & attached]
    if not streams:
        raise ReadError(path, "the file has no video stream")
    return container.decode(streams[0])


def video_frames(path, max_frames: int | None = None, mode: str = "RGB", total: int | None = None) -> list:
    """Decodes a clip file into PIL images of `mode` ("RGB" or "L"), subsampled to max_frames
    as `subsample_indices` says. A video file (any container, VIDEO_EXTENSIONS and whatever else
    FFmpeg opens) is decoded with PyAV; a .gif with Pillow.

    total: the clip's frame count if known (what `check_video` returned for it); which frames
    are kept depends on it. Without it (and with a max_frames) the file is decoded twice: once
    to count its frames, once to keep the chosen ones. Either way only the kept frames are held
    in memory, never the whole clip. A wrong `total` (the file changed since it was counted) costs
    a second decode, not wrong frames.

    Raises RuntimeError if a video file needs the missing PyAV; ReadError if the file is missing,
    cannot be decoded, has no video stream or holds no frame.
    """
    if _is_animated_name(path):
        return _animated_frames(path, max_frames, mode)
    av = _import_av(path)
    if max_frames is not None and total is None:
        total = count_video_frames(path)  # decodes without keeping a frame
    keep = None if max_frames is None else subsample_indices(total, max_frames)
    images, seen = _keep_frames(av, path, keep, mode)
    if keep is not None and seen != total:
        # the file changed since `total` was counted: choose again from what it holds now
        images, seen = _keep_frames(av, path, subsample_indices(seen, max_frames), mode)
    if not seen:
        raise ReadError(path, "the video holds no frames")
    return images


def _keep_frames(av, path, keep, mode: str):
    """(PIL images of `mode` of the frames at the indices `keep` (all frames when None), the
    number of frames decoded). Decodes the whole stream, holding one decoded frame at a time
    besides the images kept: a 600-frame 640x480 clip held whole was 270 MB to keep 4 frames."""
    wanted = None if keep is None else set(keep)
    images, seen = [], 0
    with _video_errors(path), av.open(os.fspath(path)) as container:
        for frame in _decoded_frames(av, container, path):
            if wanted is None or seen in wanted:
                images.append(frame.to_image().convert(mode))
            seen += 1
            del frame  # released before the decoder makes the next one, not after
    return images, seen


mp4_frames = video_frames  # the name from when only .mp4 was read


def _animated_frames(path, max_frames: int | None, mode: str) -> list:
    """The frames of an animated image (GIF) as PIL images of `mode`; ReadError if it cannot be
    decoded. Pillow applies each frame's disposal, so frame k is the picture shown at step k."""
    Image = import_pillow(path, "the animated image")
    with _image_errors(path), Image.open(path) as im:
        total = getattr(im, "n_frames", 1)
        images = []
        for i in subsample_indices(total, max_frames):
            im.seek(i)
            im.load()
            images.append(_convert(im, mode))
        return images


def _count_animated_frames(path) -> int:
    Image = import_pillow(path)
    with _image_errors(path), Image.open(path) as im:
        total = getattr(im, "n_frames", 1)
        for i in range(total):  # every frame decoded: a truncated last frame fails here
            im.seek(i)
            im.load()
        return total


# Top-level boxes of ISO base media (.mp4 .m4v .mov, QuickTime included): a box of another type
# at the top level is not judged (trailing bytes some cameras append could read as any size).
_MP4_TOP = frozenset((b"ftyp", b"styp", b"moov", b"mdat", b"moof", b"mfra", b"free", b"skip",
                      b"wide", b"pnot", b"uuid", b"sidx", b"ssix", b"meta", b"pdin", b"prft", b"emsg"))
# a writer that counts the 8-byte chunk header in a RIFF size (a known bug) is not called short
_RIFF_SLACK = 8


def _ebml_vint(data: bytes, at: int, keep_marker: bool):
    """(value, length, all value bits set) of the EBML variable-length integer at data[at], or
    None when it is not one (a first byte of 0, or past the end)."""
    if at >= len(data) or data[at] == 0:
        return None
    length = 9 - data[at].bit_length()  # 1 + the number of leading zero bits
    if at + length > len(data):
        return None
    value = int.from_bytes(data[at:at + length], "big")
    bits = 7 * length
    payload = value & ((1 << bits) - 1)
    return (value if keep_marker else payload), length, payload == (1 << bits) - 1


def _declared_short(path) -> str | None:
    """Why a video file is shorter than its container says it is, else None.

    What a muxer records, once the file is complete, is compared with the file's size: the RIFF
    chunks of an .avi, the Segment of a Matroska file (.mkv .webm), the top-level boxes of an
    ISO / QuickTime file (.mp4 .m4v .mov). A file cut off (an interrupted copy or download) ends
    inside one of them. That is read from the bytes, not from decoding, which stops quietly at
    the cut and returns fewer frames: the decoded frame count and duration are no test, since a
    valid file may decode fewer frames than its header counts (dropped frames of a variable
    frame rate .avi, frames an .mp4 edit list cuts). Not judged (None): other containers, a
    Matroska file written as a live stream (Segment of unknown size), an .avi written where the
    muxer could not seek back (RIFF size 0xFFFFFFFF), anything malformed (decoding reports that)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                # RIFF 'AVI ' then, past 1 GB (OpenDML), RIFF 'AVIX' chunks, back to back
                at = 0
                while at + 8 <= size:
                    f.seek(at)
                    chunk = f.read(8)
                    if chunk[:4] != b"RIFF":
                        return None
                    declared = int.from_bytes(chunk[4:8], "little")
                    if declared == 0xFFFFFFFF:
                        # FFmpeg's placeholder, left when the writer could not seek back to
                        # fill it in (a pipe, a FIFO): a complete file may carry it, so no end
                        # is recorded to compare with (a killed writer's file is not judged)
                        return None
                    end = at + 8 + declared
                    if end > size + _RIFF_SLACK:
                        return (f"truncated: its RIFF chunk at byte {at} runs to byte {end}, the file ends "
                                f"at byte {size} (cut off, e.g. an interrupted copy or download?)")
                    at = end + (end - at) % 2  # chunks are padded to an even size
                return None
            if head[:4] == b"\x1a\x45\xdf\xa3":  # the EBML header of a Matroska / WebM file
                ident = _ebml_vint(head, 0, True)
                header = ident and _ebml_vint(head, ident[1], False)
                if not header:
                    return None
                at = ident[1] + header[1] + header[0]  # the element after the EBML header
                f.seek(at)
                data = f.read(12)
                ident = _ebml_vint(data, 0, True)
                if not ident or ident[0] != 0x18538067:  # not the Segment: not judged
                    return None
                length = _ebml_vint(data, ident[1], False)
                if not length or length[2]:  # unknown size (a live stream): not judged
                    return None
                start = at + ident[1] + length[1]
                end = start + length[0]
                if end > size:
                    return (f"truncated: its Matroska Segment runs to byte {end}, the file ends at byte "
                            f"{size} (cut off, e.g. an interrupted copy or download?)")
                return None
            if head[4:8] in _MP4_TOP:
                at = 0
                while at + 8 <= size:
                    f.seek(at)
                    box = f.read(16)
                    length, kind = int.from_bytes(box[:4], "big"), box[4:8]
                    if kind not in _MP4_TOP:
                        return None
                    if length == 0:  # the last box, to the end of the file
                        return None
                    if length == 1:  # a 64-bit size follows the type
                        if len(box) < 16:
                            break
                        length = int.from_bytes(box[8:16], "big")
                    if length < 8:  # malformed: decoding says what is wrong
                        return None
                    if at + length > size:
                        return (f"truncated: its {kind.decode('latin-1')!r} box at byte {at} runs to byte "
                                f"{at + length}, the file ends at byte {size} (cut off, e.g. an "
                                "interrupted copy or download?)")
                    at += length
                return None
    except OSError:
        return None  # opening it for decoding reports the same problem with its reason
    return None


def count_video_frames(path) -> int:
    """Decodes every frame of a clip file once (no colour conversion) and returns their number;
    raises ReadError like `video_frames`, RuntimeError when a video file needs the missing PyAV."""
    if _is_animated_name(path):
        return _count_animated_frames(path)
    av = _import_av(path)
    short = _declared_short(path)
    if short:
        raise ReadError(path, short)
    with _video_errors(path), av.open(os.fspath(path)) as container:
        total = sum(1 for _ in _decoded_frames(av, container, path))
    if not total:
        raise ReadError(path, "the video holds no frames")
    return total


def check_video(path) -> int:
    """Decodes a clip (frame folder, video file or animated .gif) once, every frame, and returns
    its number of frames; raises ReadError (or RuntimeError when a video file needs the missing
    PyAV)."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ReadError(path, "the frame folder holds no frame images")
        for f in files:
            check_image(f)
        return len(files)
    if not os.path.exists(path):
        raise ReadError(path, "file not found")
    return count_video_frames(path)


def resize_uint8(im, size: tuple[int, int]) -> np.ndarray:
    """PIL image -> uint8 [H, W, C] (C = 1 for mode "L"), bilinear resize to size=(H, W) if needed.
    The pixels every sample is made of: `normalise` turns them into the model's input, and
    `dtl-fast data prepare` stores exactly these bytes."""
    from PIL import Image

    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalise(pixels, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., H, W, C] (numpy or tensor) -> float32 [..., C, H, W]: scaled to [0, 1],
    then (x - mean) / std per channel (mean, std: float32 [C, 1, 1])."""
    if isinstance(pixels, np.ndarray):  # also read-only ones (PIL views, memmaps): a float copy
        x = torch.from_numpy(pixels.astype(np.float32))
    else:
        x = pixels.to(torch.float32)
    x = x.movedim(-1, -3) * (1.0 / 255.0)
    return (x - mean) / std


def to_tensor(im, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """PIL image -> float32 [C, H, W]: bilinear resize to size=(H, W) if needed, scale to
    [0, 1], then (x - mean) / std per channel (mean, std: float32 [C, 1, 1])."""
    return normalise(resize_uint8(im, size), mean, std)


def load_image_uint8(path, size, mode: str) -> np.ndarray:
    """An image file -> uint8 [H, W, C] at size=(H, W); raises ReadError."""
    return resize_uint8(open_image(path, mode), size)


def load_video_uint8(path, size, mode: str, max_frames: int | None, total: int | None = None) -> np.ndarray:
    """A clip (frame folder, video file or animated .gif) -> uint8 [T, H, W, C], 1 <= T <= max_frames, frames
    subsampled as `subsample_indices` says; raises ReadError (RuntimeError when a video file
    needs the missing PyAV). total: the clip's frame count from `check_video`, if known: a
    video file is then decoded once instead of twice (see `video_frames`)."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ReadError(path, "the frame folder holds no frame images")
        keep = subsample_indices(len(files), max_frames)
        images = [open_image(files[i], mode) for i in keep]  # only the kept frames are decoded
    else:
        images = video_frames(path, max_frames, mode, total)
    return np.stack([resize_uint8(im, size) for im in images])


def read_image(path, size, mean, std, mode: str) -> torch.Tensor:
    """An image file -> float32 [C, H, W] (load_image_uint8, then normalise); raises ReadError."""
    return normalise(load_image_uint8(path, size, mode), mean, std)


def read_video(path, size, mean, std, mode: str, max_frames: int | None, total: int | None = None) -> torch.Tensor:
    """A clip (frame folder or video file) -> float32 [T, C, H, W], 1 <= T <= max_frames
    (load_video_uint8, then normalise; total as there); raises ReadError (RuntimeError when a
    video file needs the missing PyAV)."""
    return normalise(load_video_uint8(path, size, mode, max_frames, total), mean, std)


def as_size(value, name: str) -> tuple[int, int]:
    """int or (H, W) of positive ints -> (H, W); ValueError naming `name` otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair
