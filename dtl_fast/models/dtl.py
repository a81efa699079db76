"""DTL, the dual task learning model: image and video encoders with shared weights, one shared
bidirectional RNN, feature exchange, the dual-modal attention (DAM) stack, frame pooling and one
shared predictor giving image, video and fused logits; dtl_loss, the dual-task objective."""
from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dtl_fast._backend import resolve_backend
from dtl_fast._checks import INTEGER_DTYPES, autocast_enabled
from dtl_fast.models.encoders import (ENCODERS, build_encoder, capturing, check_choice,
                                      check_images, check_int, check_video_lengths, check_videos,
                                      encode_frames, SpatialReadout, to_device_async)
from dtl_fast.nn import GRU, LSTM, DualModalAttention, FeatureExchange, FramePool
from dtl_fast.nn.attention import _check_module_param, _Lengths

__all__ = ["DTL", "DTLOutput", "dtl_loss", "RNNS", "set_fused_backend"]

RNNS = ("lstm", "gru")


class DTLOutput(NamedTuple):
    """The three views' logits, each [B, num_classes] in the model's compute dtype."""
    image: torch.Tensor
    video: torch.Tensor
    fused: torch.Tensor


def set_fused_backend(root: nn.Module, backend: str | None) -> None:
    """Sets `backend` on every dtl_fast module inside `root` (LSTM / GRU, FramePool and every
    attention module, nested ones included): every module with a `backend` property.
    ValueError for a value that is not a backend."""
    if backend is not None:
        resolve_backend(backend)
    for m in root.modules():
        if m is root:
            continue
        if isinstance(getattr(type(m), "backend", None), property):
            m.backend = backend


def _check_dropout(owner: str, dropout) -> float:
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def _check_backend(owner: str, backend) -> None:
    if backend is not None:
        try:
            resolve_backend(backend)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None


class DTL(nn.Module):
    r"""Dual task learning over an image and a video of the same sample.

    With E the encoder (shared by both modalities), R the bidirectional RNN (shared), FX the
    feature exchange, DAM the dual-modal attention stack, P = FramePool("mean"), Q a
    SpatialReadout (a frame's feature map -> one token) and F the shared predictor
    (LayerNorm -> Linear(dim, dim) -> GELU -> Dropout -> Linear(dim, classes)):

        x_i = tokens(E(image))                    [B, S, D]   spatial tokens, row-major
        x_v[b, t] = ReLU(Q(E(video[b, t])))    [B, T, D]   t < L[b] only; zero at padding
        h_i = R(x_i),  h_v = R(x_v; L)            [B, S, 2H], [B, T, 2H]
        a_i, a_v = FX(h_i, h_v; L)                [B, S, dim], [B, T, dim]
        o_i, o_v, s = DAM(a_i, a_v; L)            s [B, dim]: DAM's hierarchical summary
        p_i = P(o_i),  p_v = P(o_v; L)            [B, dim]   (mean over valid tokens)
        z_f = s + p_i + p_v                       the fused vector (both pooled views plus the
                                                  summary, so the fused head also trains them)
        logits: image = F(p_i), video = F(p_v), fused = F(z_f)

    D = width for encoder="cnn" (S = ceil(H/4) * ceil(W/4)), 512 for "resnet18". Padded frames
    (t >= L[b]) are never encoded nor read: the outputs do not depend on them. When image and
    frames have the same size (and the encoder is the CNN) both go through one encoder call.

    Args (all keyword except num_classes; `.config` holds them, `DTL(**model.config)`
    rebuilds the model):
        num_classes: >= 2.
        in_channels: channels of images and frames.
        encoder: "cnn" (ConvEncoder, GroupNorm) or "resnet18" (torchvision, optional
            dependency; RuntimeError naming `pip install torchvision` without it).
        encoder_weights: None or the path of a local state_dict for the encoder (a torchvision
            resnet18 state_dict, fc.* ignored, or a ConvEncoder state_dict); never downloaded.
        width: channels of the "cnn" encoder.
        rnn: "lstm" or "gru" (dtl_fast.nn.LSTM / GRU, one layer, bidirectional, batch-first).
        hidden_size: RNN hidden size per direction (H).
        dim: width of the feature exchange, DAM and predictor; divisible by num_heads.
        num_heads, num_layers, window, num_memory: the DAM stack (window None drops the
            short-term branch, num_memory 0 the long-term one); num_heads also for FX.
        dropout: in [0, 1): attention values, DAM residuals / MLP, predictor hidden layer.
        backend: "auto" | "fused" | "reference" | None (None: each module reads
            $DTL_FAST_BACKEND at call time, else "auto"). Reaches every fused module;
            `model.backend = ...` or `model.set_backend(...)` switches them all.

    forward(images [B, C, H, W], videos [B, T, C, H', W'], lengths [B]) -> DTLOutput
        images / videos: float32 / float64 / float16 / bfloat16, the same dtype, on the
        parameters' device and with their dtype (under autocast any dtype but float64);
        lengths: an integer tensor (or a list of ints) on the CPU or the videos' device,
        1 <= lengths[b] <= T. Returns DTLOutput(image, video, fused), each [B, num_classes].
        A bad argument raises ValueError naming it.

    Static-shape mode (`model.static_shapes = True`, and always while torch.compile traces the
    model or a CUDA graph is captured): every frame slot goes through the encoder (padded ones
    as zeros, their tokens zeroed), so no shape depends on the lengths' values, and the
    lengths stay on their device, never read on the host by the model (range check: an
    asynchronous device assert under compile / capture; check them on the host before filling
    a captured buffer). Under capture the lengths must be a tensor on the videos' device.
    Same function as the default mode (the valid frames only) for the ConvEncoder; more encoder
    work when clips are short. The ops below may still read device lengths on the host in eager
    mode (see the ops' docs); CPU lengths in the default mode cost no device sync anywhere.

    Argument checks of images / videos run once per (shape, dtype, device) and are cached.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, encoder: str = "cnn",
                 encoder_weights=None, width: int = 64, rnn: str = "lstm", hidden_size: int = 64,
                 dim: int = 128, num_heads: int = 4, num_layers: int = 2, window: int | None = 2,
                 num_memory: int = 4, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        owner = "DTL"
        check_int(owner, "num_classes", num_classes, minimum=2)
        check_int(owner, "in_channels", in_channels)
        check_choice(owner, "encoder", encoder, ENCODERS)
        check_int(owner, "width", width)
        check_choice(owner, "rnn", rnn, RNNS)
        check_int(owner, "hidden_size", hidden_size)
        check_int(owner, "dim", dim)
        check_int(owner, "num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"{owner}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_int(owner, "num_layers", num_layers)
        check_int(owner, "window", window, minimum=0, allow_none=True)
        check_int(owner, "num_memory", num_memory, minimum=0)
        dropout = _check_dropout(owner, dropout)
        _check_backend(owner, backend)
        if encoder_weights is not None and not isinstance(encoder_weights, (str, os.PathLike)):
            raise ValueError(f"{owner}: encoder_weights must be None or a file path, got "
                             f"{type(encoder_weights).__name__}")
        self._config = dict(
            num_classes=int(num_classes), in_channels=int(in_channels), encoder=encoder,
            encoder_weights=None if encoder_weights is None else os.fspath(encoder_weights),
            width=int(width), rnn=rnn, hidden_size=int(hidden_size), dim=int(dim),
            num_heads=int(num_heads), num_layers=int(num_layers),
            window=None if window is None else int(window), num_memory=int(num_memory),
            dropout=dropout)
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        # the submodules get the checked values as Python ints (torch.nn.LSTM refuses e.g. a
        # NumPy integer hidden_size that check_int accepts)
        c = self._config
        hidden_size, dim, num_heads = c["hidden_size"], c["dim"], c["num_heads"]

        self.encoder = build_encoder(encoder, c["in_channels"], c["width"], encoder_weights,
                                     owner=owner)
        feat = self.encoder.out_channels
        self.frame_readout = nn.Sequential(SpatialReadout(feat, feat), nn.ReLU())
        rnn_cls = LSTM if rnn == "lstm" else GRU
        self.rnn = rnn_cls(feat, hidden_size, batch_first=True, bidirectional=True)
        self.exchange = FeatureExchange(2 * hidden_size, 2 * hidden_size, dim, num_heads,
                                        dropout=dropout)
        self.dam = DualModalAttention(dim, num_heads, num_layers=c["num_layers"], window=c["window"],
                                      num_memory=c["num_memory"], dropout=dropout)
        self.pool = FramePool("mean")
        self.predictor = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                       nn.Dropout(dropout), nn.Linear(dim, self.num_classes))
        self.static_shapes = False
        self._checked_inputs: set = set()
        self.backend = backend

    # -- backend, config ------------------------------------------------------------------------
    @property
    def backend(self) -> str | None:
        """The backend every fused module inside uses ("auto" | "fused" | "reference"), or None
        ($DTL_FAST_BACKEND, else "auto", read at each call). Assigning sets it on all of them."""
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        _check_backend("DTL", value)
        set_fused_backend(self, value)
        self.__dict__["_backend"] = value

    def set_backend(self, backend: str | None) -> "DTL":
        """Sets `backend` on every fused module inside; returns self."""
        self.backend = backend
        return self

    @property
    def config(self) -> dict:
        """The constructor's keyword arguments (JSON-serialisable, num_classes included, the
        current backend): DTL(**model.config) builds a model of the same shapes. To rebuild one
        for a checkpoint, encoder_weights may be set to None (the state_dict holds them)."""
        return dict(self._config, backend=self.backend)

    # -- forward --------------------------------------------------------------------------------
    def __setstate__(self, state: dict) -> None:
        # A DTL pickled whole (torch.save(model)) before static-shape mode and the input-check
        # cache existed has neither attribute.
        state.setdefault("static_shapes", False)
        state.setdefault("_checked_inputs", set())
        super().__setstate__(state)

    def _check_inputs(self, images, videos) -> None:
        """images / videos: their own checks, then against each other and against the model's
        parameters (device; dtype outside autocast). Eager: once per (shapes, dtypes, devices,
        the parameters' dtype and device, autocast on or off), then cached; under torch.compile
        every trace runs them (once per shape: they cost nothing at run time)."""
        owner = "DTL"
        param = self.predictor[-1].weight
        key = None
        if (not torch.compiler.is_compiling() and isinstance(images, torch.Tensor)
                and isinstance(videos, torch.Tensor)):
            key = (tuple(images.shape), images.dtype, images.device, tuple(videos.shape),
                   videos.dtype, videos.device, param.dtype, param.device,
                   autocast_enabled(images.device.type))
            if key in self._checked_inputs:
                return
        check_images(owner, images, self.in_channels)
        check_videos(owner, videos, self.in_channels)
        if images.shape[0] != videos.shape[0]:
            raise ValueError(f"{owner}: images and videos must have the same batch size B, got "
                             f"{images.shape[0]} and {videos.shape[0]}")
        if images.dtype != videos.dtype or images.device != videos.device:
            raise ValueError(f"{owner}: images and videos must have the same dtype and device, got "
                             f"{images.dtype} on {images.device} and {videos.dtype} on {videos.device}")
        _check_module_param(owner, "images", images, param)
        if key is not None and len(self._checked_inputs) < 64:
            self._checked_inputs.add(key)

    def forward(self, images: torch.Tensor, videos: torch.Tensor, lengths) -> DTLOutput:
        owner = "DTL"
        self._check_inputs(images, videos)
        static = self.static_shapes or torch.compiler.is_compiling() or capturing(videos)
        lengths = check_video_lengths(owner, lengths, videos, keep_device=static)
        # lengths: CPU int64 (default mode; the RNN, pooling and attention ops check them on the
        # host and copy them without a device sync) or on the videos' device (static mode);
        # masks and counts use one copy on the device.
        L = _Lengths(lengths, to_device_async(lengths, videos.device))

        frame_tokens, image_map = encode_frames(self.encoder, self.frame_readout, videos, lengths,
                                                images, static=static)
        image_tokens = image_map.flatten(2).transpose(1, 2)
        h_i, _ = self.rnn(image_tokens)
        h_v, _ = self.rnn(frame_tokens, lengths=lengths)
        # the modules' own argument checks are skipped: shapes come from the layers above and
        # the lengths were checked once, against T = every sequence length below
        a_i, a_v, _, _ = self.exchange._exchange(h_i, h_v, None, L)
        o_i, o_v, summary = self.dam._run(a_i, a_v, None, L)
        p_i = self.pool(o_i)
        p_v = self.pool(o_v, lengths)
        z_f = summary + p_i + p_v
        B = images.shape[0]
        # the shared predictor once over the three views stacked: [3B, dim] -> [3B, classes]
        logits = self.predictor(torch.cat([p_i, p_v, z_f.to(p_i.dtype)], dim=0))
        return DTLOutput(logits[:B], logits[B:2 * B], logits[2 * B:])

    def extra_repr(self) -> str:
        c = self._config
        return (f"num_classes={c['num_classes']}, encoder={c['encoder']!r}, rnn={c['rnn']!r}, "
                f"hidden_size={c['hidden_size']}, dim={c['dim']}, num_heads={c['num_heads']}, "
                f"num_layers={c['num_layers']}" + (f", backend={self.backend!r}" if self.backend else ""))


def dtl_loss(output: DTLOutput, labels: torch.Tensor, weights=(1.0, 1.0, 1.0)) -> torch.Tensor:
    r"""The dual-task objective: w_i CE(image, y) + w_v CE(video, y) + w_f CE(fused, y), each
    cross-entropy the mean over the batch (F.cross_entropy).

    output: DTLOutput (or any 3-sequence of floating logits [B, num_classes], one dtype and
    device); labels: an integer tensor [B] in [0, num_classes) on the logits' device; weights:
    three non-negative numbers.
    Returns a 0-d tensor in the logits' dtype (float32 under autocast, where F.cross_entropy
    runs in float32).

    A bad argument raises ValueError naming it. The labels' range is checked on the host when
    they are on the CPU (free); labels on a GPU are not read (that would cost every step a
    device sync), so a class index out of range there is F.cross_entropy's device-side assert
    (and its ignore_index, -100, is ignored there; the objective has no ignored samples, so on
    the CPU -100 is refused like any index outside [0, num_classes)).
    """
    if not isinstance(output, (tuple, list)) or len(output) != 3:
        raise ValueError(f"dtl_loss: output must be a DTLOutput (image, video, fused logits), got "
                         f"{type(output).__name__}")
    if (not isinstance(weights, (tuple, list)) or len(weights) != 3 or any(
            not isinstance(w, numbers.Real) or isinstance(w, bool) or not w >= 0 for w in weights)):
        raise ValueError(f"dtl_loss: weights must be three numbers >= 0 (image, video, fused), "
                         f"got {weights!r}")

    def describe(t) -> str:
        return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__

    first = output[0]
    for name, logits in zip(("image", "video", "fused"), output):
        if (not isinstance(logits, torch.Tensor) or not isinstance(first, torch.Tensor)
                or logits.dim() != 2 or logits.shape != first.shape):
            raise ValueError(f"dtl_loss: output.{name} must be logits [B, num_classes] like "
                             f"output.image {describe(first)}, got {describe(logits)}")
        if not logits.is_floating_point():
            raise ValueError(f"dtl_loss: output.{name} must be floating-point logits, got {logits.dtype}")
        if logits.dtype != first.dtype or logits.device != first.device:
            raise ValueError(f"dtl_loss: output.{name} must have the dtype and device of "
                             f"output.image ({first.dtype} on {first.device}), got {logits.dtype} "
                             f"on {logits.device}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != first.shape[0]:
        raise ValueError(f"dtl_loss: labels must be an integer tensor [B] = [{first.shape[0]}], got "
                         f"{describe(labels)}")
    if labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"dtl_loss: labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.device != first.device:
        raise ValueError(f"dtl_loss: labels must be on the logits' device ({first.device}), got "
                         f"{labels.device}")
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        values = labels.tolist()  # (min / max in Python: one read, no dispatched op)
        lo, hi = min(values), max(values)
        if lo < 0 or hi >= first.shape[1]:
            raise ValueError(f"dtl_loss: labels must be class indices in [0, num_classes) = "
                             f"[0, {first.shape[1]}), got {lo if lo < 0 else hi}")
    labels = labels.to(torch.int64)
    total = None
    for w, logits in zip(weights, output):
        term = float(w) * F.cross_entropy(logits, labels)
        total = term if total is None else total + term
    return total
