"""Per-modality feature extractors of DTL and the input checks the models share.

- ConvEncoder: a small CNN with GroupNorm (no BatchNorm, so DistributedDataParallel over several
  processes computes exactly what one process computes with the same global batch).
- ResNet18Encoder: torchvision's ResNet-18 trunk (an optional dependency), weights only from a
  local file; it has BatchNorm (see its docstring).
- build_encoder: the name -> module switch the models use, with local weight loading.
- encode_frames: one encoder over the valid frames of a padded batch of clips only.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from dtl_fast._checks import as_lengths_tensor
from dtl_fast._device import to_device_async  # re-exported: dtl.py imports it from here
from dtl_fast.nn.attention import capturing, check_range_no_sync

__all__ = ["ConvEncoder", "ResNet18Encoder", "build_encoder", "encode_frames", "ENCODERS"]

ENCODERS = ("cnn", "resnet18")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# argument checks shared by the models
# --------------------------------------------------------------------------------------------
def check_int(owner: str, name: str, value, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """Returns int(value); ValueError naming `name` unless an integer >= minimum (or None)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {kind}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_images(owner: str, images, in_channels: int, name: str = "images") -> None:
    """images: a floating tensor [B, C, H, W] with C == in_channels and H, W >= 1."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{owner}: {name} must be a 4-D tensor [B, C, H, W], got shape "
                         f"{tuple(images.shape)}")
    if images.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{owner}: {name} must be float32, float64, float16 or bfloat16, got {images.dtype}")
    if images.shape[1] != in_channels:
        raise ValueError(f"{owner}: {name} must have C = in_channels = {in_channels} channels "
                         f"(dim 1 of [B, C, H, W]), got shape {tuple(images.shape)}")
    if images.shape[0] < 1 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{owner}: {name} must be non-empty, got shape {tuple(images.shape)}")


def check_videos(owner: str, videos, in_channels: int, name: str = "videos") -> None:
    """videos: a floating tensor [B, T, C, H, W] with C == in_channels and T, H, W >= 1."""
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor [B, T, C, H, W], got "
                         f"{type(videos).__name__}")
    if videos.dim() != 5:
        raise ValueError(f"{owner}: {name} must be a 5-D tensor [B, T, C, H, W], got shape "
                         f"{tuple(videos.shape)}")
    if videos.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{owner}: {name} must be float32, float64, float16 or bfloat16, got {videos.dtype}")
    if videos.shape[2] != in_channels:
        raise ValueError(f"{owner}: {name} must have C = in_channels = {in_channels} channels "
                         f"(dim 2 of [B, T, C, H, W]), got shape {tuple(videos.shape)}")
    if min(videos.shape) < 1:
        raise ValueError(f"{owner}: {name} must be non-empty, got shape {tuple(videos.shape)}")


def check_video_lengths(owner: str, lengths, videos: torch.Tensor, *, keep_device: bool = False
                        ) -> torch.Tensor:
    """lengths of a padded batch of clips: an integer tensor [B] (or a list of ints) on the CPU
    or on videos' device with 1 <= lengths[b] <= T. Returns it as int64.

    Default: on the CPU. Lengths on a GPU are copied to the CPU once here (one host sync). The
    CPU copy is what the model passes on: every module below then checks it on the host and
    copies it to the GPU without waiting, where GPU lengths would cost each module a sync of
    its own.

    keep_device=True (static-shape mode: torch.compile, CUDA graph capture): the lengths stay
    where they are and are never read on the host while a graph is captured or traced (the
    range check is then an asynchronous device assert; the caller checks values on the host
    before filling a captured buffer). Under capture they must already be on videos' device:
    a CPU tensor would be a host-to-device copy from memory the graph cannot own."""
    if lengths is None:
        raise ValueError(f"{owner}: lengths is required: an integer tensor [B] with the number of "
                         "valid frames of each clip")
    B, T = videos.shape[0], videos.shape[1]
    lengths = as_lengths_tensor(lengths, B, videos.device, owner=owner, name="lengths",
                                device_name="videos", required=True)
    if keep_device and capturing(videos) and lengths.device != videos.device:
        raise ValueError(f"{owner}: while a CUDA graph is captured, lengths must be an integer "
                         f"tensor on the videos' device ({videos.device}), a static buffer checked "
                         f"on the host before it was filled; got a tensor on {lengths.device}")
    if not keep_device and lengths.device.type != "cpu" and not torch.compiler.is_compiling():
        lengths = lengths.cpu()
    check_range_no_sync(lengths, 1, T, owner=owner, name="lengths",
                        span=f"[1, T] = [1, {T}] (T = videos.shape[1])")
    return lengths.to(torch.int64)


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------
def _groups(channels: int) -> int:
    # up to 8 groups (GroupNorm's usual choice), a divisor of the width, and at least 2
    # channels per group where the width allows it: a group of one channel on a 1 x 1 map
    # would normalise a single value (GroupNorm refuses that in training)
    g = math.gcd(channels, 8)
    while g > 1 and channels // g < 2:
        g //= 2
    return g


class ConvEncoder(nn.Module):
    r"""A small CNN: three conv3x3 -> GroupNorm -> ReLU blocks, the last two with stride 2.

        x [N, C, H, W] -> [N, width, H1, W1],  H1 = ceil(ceil(H / 2) / 2) (= H / 4 when 4 | H)

    GroupNorm (up to 8 groups of >= 2 channels) instead of BatchNorm: every sample is normalised on its
    own, so the output of a sample does not depend on the rest of the batch (padding and
    DistributedDataParallel cannot change it).

    Args:
        in_channels: C of the input.
        width: channels of every block and of the output.

    forward(x) -> feature map [N, width, H1, W1] in x's dtype.
    tokens(x) -> [N, H1 * W1, width]: the spatial tokens in row-major order.
    Works for any H, W >= 1 (H, W >= 4 gives at least a 1 x 1 map without degenerate padding).
    """

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        check_int("ConvEncoder", "in_channels", in_channels)
        check_int("ConvEncoder", "width", width)
        self.in_channels, self.width = int(in_channels), int(width)
        self.out_channels = self.width

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                                 nn.GroupNorm(_groups(c_out), c_out), nn.ReLU())

        self.blocks = nn.Sequential(block(self.in_channels, self.width, 1),
                                    block(self.width, self.width, 2),
                                    block(self.width, self.width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, width={self.width}"


def _torchvision_resnet18():
    try:
        import torchvision
    except ImportError as exc:
        raise RuntimeError(
            'encoder="resnet18" needs torchvision, an optional dependency that is not installed '
            f"({exc}): pip install torchvision (a build matching your torch), or use "
            'encoder="cnn"') from exc
    return torchvision.models.resnet18(weights=None)  # weights=None: never downloads


_SWAP_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_SWAP_LOCKS_GUARD = threading.Lock()


def _swap_lock(module: nn.Module) -> threading.RLock:
    """The lock under which `module`'s BatchNorm buffers may be swapped (ResNet18Encoder
    .forward_images) or read (its forward): concurrent calls on one encoder from several threads
    (a threaded inference server) each see one set of statistics. Kept outside the module, so it
    deep-copies and pickles as before; uncontended, ~0.1 us."""
    lock = _SWAP_LOCKS.get(module)
    if lock is None:
        with _SWAP_LOCKS_GUARD:
            lock = _SWAP_LOCKS.setdefault(module, threading.RLock())
    return lock


class ResNet18Encoder(nn.Module):
    """torchvision's ResNet-18 without its average pool and classifier: [N, C, H, W] ->
    [N, 512, ceil(H / 32), ceil(W / 32)] (about). Same submodule names as torchvision's resnet18
    (conv1, bn1, layer1..layer4), so its state_dict loads here as it is (fc.* ignored).

    Built with weights=None: nothing is ever downloaded; pretrained weights come only from a
    local file (build_encoder's `weights`). in_channels != 3 replaces conv1 (its weights then
    cannot come from an RGB checkpoint).

    Note: ResNet-18 uses BatchNorm, so unlike ConvEncoder its output depends on the batch in
    training mode; under DistributedDataParallel convert it with
    torch.nn.SyncBatchNorm.convert_sync_batchnorm to match one process.
    Requires torchvision (RuntimeError naming `pip install torchvision` otherwise).

    Two sets of BatchNorm running statistics, one set of weights: forward(x) uses (and in
    training mode updates) the BatchNorm layers' own, forward_images(x) a second set kept as
    buffers `images_<layer path>` (DTL encodes a clip's frames and its image in two calls of one
    shared encoder; with one set both calls would update it, and in eval() each modality would
    be normalised with a blend of the two that neither was normalised with in training). A
    state_dict without the second set (torchvision's, or one saved before it existed) loads
    with it copied from the first.
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        check_int("ResNet18Encoder", "in_channels", in_channels)
        net = _torchvision_resnet18()
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.in_channels = int(in_channels)
        self.out_channels = 512
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))
        # {path of a BatchNorm buffer: name of its images' twin}, registered as plain buffers
        # (moved, saved, broadcast by DistributedDataParallel like the BatchNorm layers' own)
        self._image_stats: dict[str, str] = {}
        for path, buf in list(self.named_buffers()):
            twin = "images_" + path.replace(".", "_")
            self.register_buffer(twin, buf.detach().clone())
            self._image_stats[path] = twin

    @property
    def image_stat_keys(self) -> tuple[str, ...]:
        """The state_dict keys of the images' running statistics (see the class docstring)."""
        return tuple(self._image_stats.values())

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._trunk(x)
        with _swap_lock(self):  # not while another thread has the images' statistics in place
            return self._trunk(x)

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) with the images' running statistics: read in eval(), updated in place in
        training mode (the BatchNorm layers' own are left as they are)."""
        if torch.compiler.is_compiling():
            stats = {path: getattr(self, twin) for path, twin in self._image_stats.items()}
            return torch.func.functional_call(self, stats, (x,), strict=False)
        # Eagerly the buffers are swapped in place and back, found by one walk over the
        # submodules (SyncBatchNorm conversion may have replaced them since): functional_call's
        # general reparametrisation cost ~0.6 ms per call (60 buffers, measured on a CPU),
        # get_submodule per buffer ~0.3 ms.
        with _swap_lock(self):  # one thread at a time sees either set, never a mix
            swaps = []
            for owner, module in self.named_modules():
                if module is self or not module._buffers:
                    continue
                for name, own in module._buffers.items():
                    twin = self._image_stats.get(f"{owner}.{name}")
                    if twin is not None:
                        swaps.append((module, name, own, self._buffers[twin]))
            for module, name, _, twin in swaps:
                module._buffers[name] = twin
            try:
                return self._trunk(x)
            finally:
                for module, name, own, _ in swaps:
                    module._buffers[name] = own

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state_dict without the images' statistics: they start as the frames' (its BatchNorm's)
        for path, twin in self._image_stats.items():
            if prefix + twin not in state_dict and prefix + path in state_dict:
                # a copy: load_state_dict(assign=True) would otherwise make both sets one tensor
                state_dict[prefix + twin] = state_dict[prefix + path].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).flatten(2).transpose(1, 2)


def load_encoder_weights(encoder: nn.Module, path, *, owner: str, ignore_prefixes=("fc.",)) -> None:
    """Loads a plain state_dict from the local file `path` into `encoder`
    (torch.load(..., weights_only=True): no code from the file is run).

    Keys starting with one of `ignore_prefixes` (a classifier head) are dropped; a "module."
    prefix on every key (a DistributedDataParallel save) is stripped. Raises FileNotFoundError
    when the file does not exist, ValueError (naming the file) when it is not a state_dict or
    does not match the encoder: the missing and unexpected keys and shape mismatches are listed.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: encoder_weights file {str(path)!r} does not exist (or is "
                                "not a file); weights are only read from a local file, never downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear error
        raise ValueError(f"{owner}: encoder_weights {str(path)!r} could not be read as a PyTorch "
                         f"state_dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{owner}: encoder_weights {str(path)!r} must hold a state_dict (a dict "
                         f"of parameter name -> tensor), got {type(state).__name__}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    # keys the encoder fills itself when absent (ResNet18Encoder's images' BatchNorm statistics)
    derived = set(getattr(encoder, "image_stat_keys", ()))
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state) - derived)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:

        def few(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {few(shapes)}")
        # a torchvision ResNet's state_dict (layer1.0.conv1.weight, ...) given to the ConvEncoder
        # or the reverse: the encoder choice is what is wrong, not the file
        resnet_file = any(k.startswith("layer4.") for k in state)
        resnet_model = any(k.startswith("layer4.") for k in own)
        hint = ""
        if resnet_file != resnet_model:
            hint = (" (the file holds a ResNet's weights: they need encoder=\"resnet18\", "
                    "--encoder resnet18)" if resnet_file else
                    " (the file does not hold a ResNet's weights: are they the ConvEncoder's, "
                    "encoder=\"cnn\", --encoder cnn?)")
        raise ValueError(f"{owner}: encoder_weights {str(path)!r} does not match the "
                         f"{type(encoder).__name__}{hint}: " + "; ".join(parts))
    encoder.load_state_dict(state, strict=True)


def build_encoder(encoder: str = "cnn", in_channels: int = 3, width: int = 64, weights=None, *,
                  owner: str = "build_encoder") -> nn.Module:
    """The image / frame encoder: "cnn" -> ConvEncoder(in_channels, width), "resnet18" ->
    ResNet18Encoder(in_channels) (width is not used: 512 channels). `weights`: None or the path
    of a local state_dict for that encoder (see load_encoder_weights). The module has
    .out_channels and .tokens(x) -> [N, S, out_channels]."""
    check_choice(owner, "encoder", encoder, ENCODERS)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"{owner}: encoder_weights must be None or a file path, got "
                         f"{type(weights).__name__}")
    module = ConvEncoder(in_channels, width) if encoder == "cnn" else ResNet18Encoder(in_channels)
    if weights is not None:
        load_encoder_weights(module, weights, owner=owner)
    return module


def valid_frame_index(lengths: torch.Tensor, T: int, device: torch.device) -> torch.Tensor:
    """Flat indices b * T + t of the valid frames (t < lengths[b]), int64 on `device`, in
    batch-major order. Computed on the CPU (lengths from a DataLoader are there; lengths on a
    GPU cost one copy) so the count never needs a device sync of its own."""
    lengths_cpu = lengths.to("cpu", torch.int64)
    valid = torch.arange(T)[None, :] < lengths_cpu[:, None]
    idx = valid.flatten().nonzero().squeeze(1)
    return to_device_async(idx, device)


class SpatialReadout(nn.Module):
    r"""A feature map to one vector that keeps where things are: average-pool to a
    grid x grid map, flatten, linear.

        x [N, C, h, w] -> [N, out_features]

    Why not the plain spatial mean: after three conv layers the receptive field is a fraction
    of the image, and the mean of local features forgets the layout a digit is made of
    (measured on the demo data: a global-average-pool CNN stayed near chance, 17 % after 5
    epochs, where the same CNN read out on a 4 x 4 grid reached 70 %).
    """

    def __init__(self, channels: int, out_features: int, grid: int = 4):
        super().__init__()
        self.grid = int(grid)
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.linear = nn.Linear(channels * self.grid * self.grid, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x).flatten(1))


def encode_frames(encoder: nn.Module, readout: nn.Module, videos: torch.Tensor,
                  lengths: torch.Tensor, images: torch.Tensor | None = None, *, static: bool = False):
    """Runs `encoder` over the valid frames only and turns each frame's feature map into one
    token with `readout` ([N, D, h, w] -> [N, D'], e.g. a SpatialReadout).

    videos [B, T, C, H, W]; lengths int64 [B] in [1, T] (checked by the caller), CPU or
    videos' device. Padded frames (t >= lengths[b]) are never read by the encoder.
    images: optional [B, C, H', W']; their feature map is returned too. With a ConvEncoder
    and H' == H, W' == W they go through the same encoder call as the frames (one call instead
    of two; GroupNorm has no batch statistics, so this changes nothing but speed); other
    encoders (BatchNorm) get two calls, so the image batch statistics stay the images' own.

    static=True: every frame slot is encoded (padded ones as zeros, their tokens then zeroed
    with torch.where: no value nor gradient of theirs reaches a valid token), so every shape
    depends on the input shapes only and nothing is read on the host: what torch.compile
    (fullgraph) and CUDA graph capture need. Same function for per-sample encoders (the
    ConvEncoder: GroupNorm); a BatchNorm encoder in training mode would see the padded frames
    in its batch statistics.

    Returns (frame_tokens [B, T, D'] zero at padded positions, image_map [B, D, h, w] or None
    when images is None). D = encoder.out_channels; dtype of the readout's output.
    """
    B, T = videos.shape[:2]
    if static:
        return _encode_frames_static(encoder, readout, videos, lengths, images)
    idx = valid_frame_index(lengths, T, videos.device)
    frames = videos.flatten(0, 1).index_select(0, idx)
    frame_map, image_map = _encode_with_images(encoder, frames, images)
    feats = readout(frame_map)
    tokens = feats.new_zeros(B * T, feats.shape[1]).index_copy(0, idx, feats)
    return tokens.view(B, T, -1), image_map


def _encode_with_images(encoder, frames, images):
    """(encoder(frames), encoder(images) or None): one encoder call over both when the CNN
    takes them together (same size and dtype), so the weights are read once; a BatchNorm
    encoder with a second set of running statistics (ResNet18Encoder.forward_images) encodes
    the images with that set."""
    n = frames.shape[0]
    if (images is not None and isinstance(encoder, ConvEncoder)
            and images.shape[2:] == frames.shape[2:] and images.dtype == frames.dtype):
        fmap = encoder(torch.cat([frames, images], dim=0))
        return fmap[:n], fmap[n:]
    if images is None:
        return encoder(frames), None
    return encoder(frames), getattr(encoder, "forward_images", encoder)(images)


def _encode_frames_static(encoder, readout, videos, lengths, images):
    B, T = videos.shape[:2]
    lengths = to_device_async(lengths, videos.device)
    valid = (torch.arange(T, device=videos.device)[None, :] < lengths[:, None]).flatten()  # [B*T]
    zero = torch.zeros((), dtype=videos.dtype, device=videos.device)
    # padded slots read as zeros whatever they hold (NaN there must not reach a gradient)
    frames = torch.where(valid[:, None, None, None], videos.flatten(0, 1), zero)
    frame_map, image_map = _encode_with_images(encoder, frames, images)
    feats = readout(frame_map)
    tokens = torch.where(valid[:, None], feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
    return tokens.view(B, T, -1), image_map
