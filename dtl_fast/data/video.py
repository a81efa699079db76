"""Reading images and clips from disk into uint8 pixels and normalised float32 tensors (Pillow,
PyAV and numpy; no torchvision).

A clip is one of:
- a folder of frame images, read in natural name order ("2.png" before "10.png");
- a video file in any container FFmpeg reads, decoded with PyAV (imported only when a video file
  is read): VIDEO_EXTENSIONS = .mp4 .m4v .mov .avi .mkv .webm; the first video stream is used
  (cover art attached to an audio file does not count as one);
- an animated .gif (or any multi-frame image Pillow reads), decoded frame by frame with Pillow.

`check_video` decodes every frame once and returns the count; `load_video_uint8` returns the
frames kept by `subsample_indices`. Every failure of the data (missing file, no video stream,
undecodable bytes, no frame) is a ReadError with the reason; a missing PyAV is a RuntimeError,
because it is not the data's fault.
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


def natural_key(name: str):
    """Sort key that orders digit runs by value: "f2.png" < "f10.png"."""
    return [(0, int(tok), tok) if tok.isdigit() else (1, 0, tok.lower())
            for tok in re.split(r"(\d+)", name) if tok]


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


@contextlib.contextmanager
def _image_errors(path):
    """Turns Pillow's many ways of failing into one ReadError naming the path and why."""
    from PIL import Image, UnidentifiedImageError

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
    from PIL import Image

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
    from PIL import Image

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


def video_frames(path, max_frames: int | None = None, mode: str = "RGB") -> list:
    """Decodes a clip file into PIL images of `mode` ("RGB" or "L"), subsampled to max_frames
    as `subsample_indices` says. A video file (any container, VIDEO_EXTENSIONS and whatever else
    FFmpeg opens) is decoded with PyAV; a .gif with Pillow.

    Raises RuntimeError if a video file needs the missing PyAV; ReadError if the file is missing,
    cannot be decoded, has no video stream or holds no frame.
    """
    if _is_animated_name(path):
        return _animated_frames(path, max_frames, mode)
    av = _import_av(path)
    with _video_errors(path), av.open(os.fspath(path)) as container:
        # keep the decoded (YUV) frames and make PIL images of the kept ones only: the frame count
        # is known once the stream ends, and a YUV 4:2:0 frame is half the bytes of its RGB image
        frames = list(_decoded_frames(av, container, path))
        if not frames:
            raise ReadError(path, "the video holds no frames")
        return [frames[i].to_image().convert(mode) for i in subsample_indices(len(frames), max_frames)]


mp4_frames = video_frames  # the name from when only .mp4 was read


def _animated_frames(path, max_frames: int | None, mode: str) -> list:
    """The frames of an animated image (GIF) as PIL images of `mode`; ReadError if it cannot be
    decoded. Pillow applies each frame's disposal, so frame k is the picture shown at step k."""
    from PIL import Image

    with _image_errors(path), Image.open(path) as im:
        total = getattr(im, "n_frames", 1)
        images = []
        for i in subsample_indices(total, max_frames):
            im.seek(i)
            im.load()
            images.append(_convert(im, mode))
        return images


def _count_animated_frames(path) -> int:
    from PIL import Image

    with _image_errors(path), Image.open(path) as im:
        total = getattr(im, "n_frames", 1)
        for i in range(total):  # every frame decoded: a truncated last frame fails here
            im.seek(i)
            im.load()
        return total


def count_video_frames(path) -> int:
    """Decodes every frame of a clip file once (no colour conversion) and returns their number;
    raises ReadError like `video_frames`, RuntimeError when a video file needs the missing PyAV."""
    if _is_animated_name(path):
        return _count_animated_frames(path)
    av = _import_av(path)
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


def load_video_uint8(path, size, mode: str, max_frames: int | None) -> np.ndarray:
    """A clip (frame folder, video file or animated .gif) -> uint8 [T, H, W, C], 1 <= T <= max_frames, frames
    subsampled as `subsample_indices` says; raises ReadError (RuntimeError when a video file
    needs the missing PyAV)."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ReadError(path, "the frame folder holds no frame images")
        keep = subsample_indices(len(files), max_frames)
        images = [open_image(files[i], mode) for i in keep]  # only the kept frames are decoded
    else:
        images = video_frames(path, max_frames, mode)
    return np.stack([resize_uint8(im, size) for im in images])


def read_image(path, size, mean, std, mode: str) -> torch.Tensor:
    """An image file -> float32 [C, H, W] (load_image_uint8, then normalise); raises ReadError."""
    return normalise(load_image_uint8(path, size, mode), mean, std)


def read_video(path, size, mean, std, mode: str, max_frames: int | None) -> torch.Tensor:
    """A clip (frame folder or video file) -> float32 [T, C, H, W], 1 <= T <= max_frames
    (load_video_uint8, then normalise); raises ReadError (RuntimeError when a video file needs
    the missing PyAV)."""
    return normalise(load_video_uint8(path, size, mode, max_frames), mean, std)


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
