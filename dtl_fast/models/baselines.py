"""Single-modality baselines for DTL's results table: the classic supervised image CNN and a
video-only model, both on the same encoder as DTL."""
from __future__ import annotations

import os

import torch
from torch import nn

from dtl_fast.models.dtl import _check_backend, set_fused_backend
from dtl_fast.models.encoders import (ENCODERS, build_encoder, capturing, check_choice,
                                      check_images, check_int, check_video_lengths, check_videos,
                                      encode_frames, SpatialReadout)
from dtl_fast.nn import FramePool
from dtl_fast.nn.attention import _check_module_param

__all__ = ["ImageBaseline", "VideoBaseline"]


def _common_config(owner, num_classes, in_channels, encoder, encoder_weights, width) -> dict:
    check_int(owner, "num_classes", num_classes, minimum=2)
    check_int(owner, "in_channels", in_channels)
    check_choice(owner, "encoder", encoder, ENCODERS)
    check_int(owner, "width", width)
    if encoder_weights is not None and not isinstance(encoder_weights, (str, os.PathLike)):
        raise ValueError(f"{owner}: encoder_weights must be None or a file path, got "
                         f"{type(encoder_weights).__name__}")
    return dict(num_classes=int(num_classes), in_channels=int(in_channels), encoder=encoder,
                encoder_weights=None if encoder_weights is None else os.fspath(encoder_weights),
                width=int(width))


class ImageBaseline(nn.Module):
    r"""The classic supervised image-only CNN: logits = R(E(image)), with E DTL's encoder
    (ConvEncoder by default, same arguments as DTL's) and R a SpatialReadout (average-pool to
    4 x 4, flatten, linear): convolutions, then a fully connected classifier.

    ImageBaseline(num_classes, *, in_channels=3, encoder="cnn", encoder_weights=None, width=64)
    .config: the constructor's keyword arguments (JSON-serialisable; ImageBaseline(**config)).
    forward(images [B, C, H, W] float, on the parameters' device with their dtype (any but
    float64 under autocast)) -> logits [B, num_classes].
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, encoder: str = "cnn",
                 encoder_weights=None, width: int = 64):
        super().__init__()
        self._config = _common_config("ImageBaseline", num_classes, in_channels, encoder,
                                      encoder_weights, width)
        c = self._config  # the checked values as Python ints
        self.in_channels = c["in_channels"]
        self.encoder = build_encoder(encoder, c["in_channels"], c["width"], encoder_weights,
                                     owner="ImageBaseline")
        self.head = SpatialReadout(self.encoder.out_channels, c["num_classes"])

    @property
    def config(self) -> dict:
        return dict(self._config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images("ImageBaseline", images, self.in_channels)
        # the parameters' device, and their dtype outside autocast: ValueError naming images
        # (a weight by attribute: nn.DataParallel's replicas hold their weights as plain
        # attributes, so parameters() would be empty there)
        _check_module_param("ImageBaseline", "images", images, self.head.linear.weight)
        return self.head(self.encoder(images))


class VideoBaseline(nn.Module):
    r"""Video-only model: each valid frame through DTL's encoder and a SpatialReadout R (one
    token per frame, as in DTL), then FramePool("mean") over the clip's valid frames and a
    linear head:

        x[b, t] = ReLU(R(E(video[b, t])))  (t < L[b] only),   logits = W mean_{t < L[b]} x[b, t] + b

    Padded frames are never encoded nor read (static-shape mode, `static_shapes = True` or
    under torch.compile / CUDA graph capture: encoded as zeros and masked, as in DTL).

    VideoBaseline(num_classes, *, in_channels=3, encoder="cnn", encoder_weights=None, width=64,
                  backend=None)
    backend: FramePool's backend ("auto" | "fused" | "reference" | None); settable.
    .config: the constructor's keyword arguments (JSON-serialisable; VideoBaseline(**config)).
    forward(videos [B, T, C, H, W] float (the parameters' device and dtype, any dtype but
    float64 under autocast), lengths [B] integer, 1 <= lengths[b] <= T, CPU or videos' device)
    -> logits [B, num_classes].
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, encoder: str = "cnn",
                 encoder_weights=None, width: int = 64, backend: str | None = None):
        super().__init__()
        self._config = _common_config("VideoBaseline", num_classes, in_channels, encoder,
                                      encoder_weights, width)
        _check_backend("VideoBaseline", backend)
        cfg = self._config  # the checked values as Python ints
        self.in_channels = cfg["in_channels"]
        self.encoder = build_encoder(encoder, cfg["in_channels"], cfg["width"], encoder_weights,
                                     owner="VideoBaseline")
        self.pool = FramePool("mean")
        c = self.encoder.out_channels
        self.readout = nn.Sequential(SpatialReadout(c, c), nn.ReLU())
        self.head = nn.Linear(c, cfg["num_classes"])
        self.static_shapes = False
        self.backend = backend

    @property
    def backend(self) -> str | None:
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        _check_backend("VideoBaseline", value)
        set_fused_backend(self, value)
        self.__dict__["_backend"] = value

    def set_backend(self, backend: str | None) -> "VideoBaseline":
        self.backend = backend
        return self

    @property
    def config(self) -> dict:
        return dict(self._config, backend=self.backend)

    def __setstate__(self, state: dict) -> None:
        # a VideoBaseline pickled whole before static-shape mode existed
        state.setdefault("static_shapes", False)
        super().__setstate__(state)

    def forward(self, videos: torch.Tensor, lengths) -> torch.Tensor:
        check_videos("VideoBaseline", videos, self.in_channels)
        _check_module_param("VideoBaseline", "videos", videos, self.head.weight)
        # static-shape mode as in DTL (see DTL's docstring): every frame slot encoded, lengths
        # kept on their device, under torch.compile, CUDA graph capture or static_shapes=True
        static = self.static_shapes or torch.compiler.is_compiling() or capturing(videos)
        lengths = check_video_lengths("VideoBaseline", lengths, videos, keep_device=static)
        tokens, _ = encode_frames(self.encoder, self.readout, videos, lengths, static=static)
        return self.head(self.pool(tokens, lengths))
