"""Reading images and clips from disk into normalised float32 tensors (Pillow + numpy, no
torchvision).

A clip is either a folder of frame images, read in natural name order ("2.png" before
"10.png"), or an .mp4 file decoded with PyAV, which is imported only when an .mp4 is read.
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
VIDEO_EXTENSIONS = (".mp4",)


class ReadError(Exception):
    """A file could not be read or decoded; str(exc) is the reason (the path is kept apart so
    callers can report path and reason as a pair)."""

    def __init__(self, path, reason: str):
        super().__init__(reason)
        self.path = str(path)
        self.reason = reason


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


def mp4_frames(path, max_frames: int | None = None, mode: str = "RGB") -> list:
    """Decodes an .mp4 clip with PyAV into PIL images of `mode`, subsampled to max_frames.

    Raises RuntimeError if PyAV is missing; ReadError if the file cannot be decoded or holds no
    video frame.
    """
    av = _import_av(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ReadError(path, "the file has no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_image() for frame in container.decode(stream)]
    except ReadError:
        raise
    except FileNotFoundError as exc:
        raise ReadError(path, "file not found") from exc
    except Exception as exc:  # PyAV raises av.error.* (OSError/ValueError subclasses) and others
        raise ReadError(path, f"corrupt or undecodable video: {type(exc).__name__}: {exc}") from exc
    if not frames:
        raise ReadError(path, "the video holds no frames")
    return [frames[i].convert(mode) for i in subsample_indices(len(frames), max_frames)]


def check_video(path) -> int:
    """Decodes a clip once (every frame) and returns its number of frames; raises ReadError
    (or RuntimeError when an .mp4 needs the missing PyAV)."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ReadError(path, "the frame folder holds no frame images")
        for f in files:
            check_image(f)
        return len(files)
    if not os.path.exists(path):
        raise ReadError(path, "file not found")
    return len(mp4_frames(path, None, "L"))


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
    """A clip (frame folder or video file) -> uint8 [T, H, W, C], 1 <= T <= max_frames, frames
    subsampled as `subsample_indices` says; raises ReadError (RuntimeError when a video file
    needs the missing PyAV)."""
    if os.path.isdir(path):
        files = frame_files(path)
        if not files:
            raise ReadError(path, "the frame folder holds no frame images")
        keep = subsample_indices(len(files), max_frames)
        images = [open_image(files[i], mode) for i in keep]  # only the kept frames are decoded
    else:
        images = mp4_frames(path, max_frames, mode)
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
