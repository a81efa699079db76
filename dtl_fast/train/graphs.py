"""The training step of `dtl-fast train`: eager, or replayed from a CUDA graph.

One step of one model is `train_step`: forward, its loss (the dual-task loss for DTL,
cross-entropy for a baseline), zero_grad, backward, Adam step; it returns the loss as a 0-d
tensor on the device. The loop adds `loss * batch size` to a per-epoch sum *on the device*
(`LossSums`) and reads it once per epoch: no `float(loss)` per step, which would wait for the
GPU at every batch.

With CUDA graphs (`StepRunner(capture=True)`), every full batch is copied into static input
buffers (`StaticBatch`: images, clips zero-padded to --max-frames, lengths, labels, one fixed
batch size), and one graph per model replays the whole step on them:

  1. the first WARMUP full batches run `train_step` eagerly on the static buffers, on a side
     stream (as PyTorch's whole-network capture recipe asks: cuBLAS / autograd / Adam state
     set up outside the capture); they are ordinary training steps;
  2. the next full batch is captured (grads set to None first, so backward allocates them in
     the graph's pool) and replayed: the capture itself runs nothing, the replay is the step;
  3. every later full batch: copy into the buffers, replay.

A batch of another size (the epoch's last, partial one) runs `train_step` eagerly, on the same
padded layout. Adam is created with capturable=True (its step count on the device), so the
captured step and the eager one are the same optimizer.

Lengths: the models check lengths on the host. `StaticBatch.fill` checks them (1 <= length <=
the clip's frames <= --max-frames) on the host *before* copying into the buffer, so a bad batch
fails with a clear error instead of a kernel reading out of bounds inside a replay; the graph
itself is handed the lengths as a device tensor (a host copy would be baked into the graph).

Everything but the capture (`capture=False`) runs on the CPU too: the buffers, the padding,
the on-device sums and the step; the CPU tests check that it gives bitwise the parameters of
the plain eager loop.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# full batches run eagerly (on a side stream) before the capture
WARMUP = 3


def autocast(device: torch.device, amp: str | None, *, graphs: bool = False):
    """torch.autocast for --amp bf16 (a null context without it). Under CUDA graphs the
    autocast weight cache is off: a cached cast made in one replay would be freed memory in the
    next (PyTorch's CUDA graphs notes)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not graphs)


def model_loss(name: str, model, images, videos, lengths, labels) -> torch.Tensor:
    """The training loss of model `name` ("dtl", "image_cnn" or "video_baseline") on a batch:
    a 0-d tensor, float32 for the float32 models `dtl-fast train` builds, with or without bf16
    autocast (the DTL's through dtl_loss: F.cross_entropy runs in float32 under autocast; the
    baselines' logits are cast)."""
    from dtl_fast.models import dtl_loss

    if name == "dtl":
        return dtl_loss(model(images, videos, lengths), labels)
    if name == "image_cnn":
        return F.cross_entropy(model(images).float(), labels)
    return F.cross_entropy(model(videos, lengths).float(), labels)


def train_step(name: str, model, optim, images, videos, lengths, labels, *, device: torch.device,
               amp: str | None, graphs: bool = False) -> torch.Tensor:
    """One optimizer step of one model on one batch; returns the loss, detached (0-d, on the
    device). images [B, C, H, W], videos [B, T, C, H', W'], lengths int64 [B] (CPU, or the
    device under capture), labels int64 [B]."""
    with autocast(device, amp, graphs=graphs):
        loss = model_loss(name, model, images, videos, lengths, labels)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.detach()


class LossSums:
    """Per-model sums of loss * batch size and the sample count, kept on the device: adding a
    step's loss queues one small kernel and never waits for it. `read()` (once per epoch, after
    the last step) copies them to the host: {name: sum}, count."""

    def __init__(self, names, device: torch.device):
        self.names = tuple(names)
        self.device = device
        # float64: CUDA and CPU both have it, and an epoch's sum then adds no rounding of its own
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)

    def add(self, losses: dict, n: int) -> None:
        """Adds each model's loss (a 0-d tensor) times the batch size `n`."""
        for i, name in enumerate(self.names):
            if name in losses:
                self.sums[i] += losses[name].to(torch.float64) * n
        self.sums[-1] += n

    def tensor(self) -> torch.Tensor:
        """The sums tensor [len(names) + 1] (the last entry is the count), e.g. to all-reduce."""
        return self.sums

    def read(self, sums: torch.Tensor | None = None) -> tuple[dict, float]:
        """({name: mean loss}, count) from the sums (or from `sums`, e.g. all-reduced ones)."""
        values = (self.sums if sums is None else sums).cpu().tolist()
        count = values[-1]
        return {name: values[i] / count for i, name in enumerate(self.names)} if count else {}, count


def pad_videos(videos: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero-pads clips [B, T, ...] to [B, frames, ...] (T <= frames; returned as is at T ==
    frames). Padding past a clip's length is zero in collate_multimodal too, and every model
    reads only a clip's first `lengths[b]` frames, so padding changes shapes, not the function."""
    T = videos.shape[1]
    if T > frames:
        raise ValueError(f"videos have {T} frames, more than --max-frames {frames}")
    if T == frames:
        return videos
    pad = videos.new_zeros((videos.shape[0], frames - T, *videos.shape[2:]))
    return torch.cat([videos, pad], dim=1)


def check_lengths(lengths: torch.Tensor, frames: int) -> None:
    """Raises ValueError unless lengths (int64 [B], on the CPU) are all in [1, frames]: the host
    check the models would do, done before a batch goes into a graph's static buffer."""
    if lengths.device.type != "cpu":
        raise ValueError("check_lengths: lengths must be on the CPU (checked on the host)")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > frames):
        raise ValueError(f"a batch has clip lengths in [{int(lengths.min())}, {int(lengths.max())}], "
                         f"outside [1, {frames}] (its clips have {frames} frames)")


class StaticBatch:
    """The static input buffers of a captured step: images [B, C, H, W], videos [B, frames, C,
    H', W'], lengths int64 [B] and labels int64 [B] on `device`, made at the first `fill`.
    `fill` copies a batch in place (same storage every time, as a graph replay needs)."""

    def __init__(self, batch_size: int, frames: int, device: torch.device):
        self.batch_size, self.frames, self.device = int(batch_size), int(frames), device
        self.images = self.videos = self.lengths = self.labels = None

    def fits(self, batch) -> bool:
        """Whether `batch` has the static batch size (the last, partial batch of an epoch does not)."""
        return int(batch.labels.shape[0]) == self.batch_size

    def fill(self, batch) -> None:
        """Copies `batch` (a MultiModalBatch; lengths on the CPU, the rest on the CPU or on the
        device) into the buffers: lengths checked on the host first, clips zero-padded to
        `frames`. Raises ValueError for a batch of another size, other sample shapes or bad
        lengths."""
        if not self.fits(batch):
            raise ValueError(f"StaticBatch.fill: batch of {int(batch.labels.shape[0])} samples, the "
                             f"buffers hold {self.batch_size}")
        videos = batch.videos
        if videos.shape[1] > self.frames:
            raise ValueError(f"StaticBatch.fill: clips of {videos.shape[1]} frames, more than "
                             f"--max-frames {self.frames}")
        check_lengths(batch.lengths, int(videos.shape[1]))
        if self.images is None:
            self.images = torch.empty_like(batch.images, device=self.device)
            self.videos = torch.zeros((self.batch_size, self.frames, *videos.shape[2:]),
                                      dtype=videos.dtype, device=self.device)
            self.lengths = torch.empty(self.batch_size, dtype=torch.int64, device=self.device)
            self.labels = torch.empty(self.batch_size, dtype=torch.int64, device=self.device)
        if batch.images.shape != self.images.shape or videos.shape[2:] != self.videos.shape[2:]:
            raise ValueError(f"StaticBatch.fill: images {tuple(batch.images.shape)} / frames "
                             f"{tuple(videos.shape[2:])} differ from the buffers' "
                             f"{tuple(self.images.shape)} / {tuple(self.videos.shape[2:])}")
        T = videos.shape[1]
        self.images.copy_(batch.images, non_blocking=True)
        self.videos[:, :T].copy_(videos, non_blocking=True)
        if T < self.frames:
            self.videos[:, T:].zero_()  # a shorter batch after a longer one: no stale frames
        self.lengths.copy_(batch.lengths, non_blocking=True)
        self.labels.copy_(batch.labels, non_blocking=True)


class StepRunner:
    """Runs the training steps of every model on each batch: `step(batch) -> {name: loss}`
    (0-d tensors on the device).

    models / optims: {name: module} / {name: optimizer} (the modules as trained: DDP- or
    torch.compile-wrapped ones). static: False runs train_step on each batch as it comes (the
    plain eager loop); True copies every full batch (of `batch_size` samples) into one
    StaticBatch and steps on the buffers, with clips padded to `frames` (other batches: padded
    the same way, stepped eagerly). capture: also capture each model's step in a CUDA graph and
    replay it (CUDA only; implies static). fallback: if the capture raises (a model that
    syncs with the host, say), record why in `capture_error` and go on eagerly instead of
    raising (for --cuda-graphs left on auto). Lengths reach the models on the CPU, except with
    capture or device_lengths (static mode): the device buffer, as the captured graph gets them.
    """

    def __init__(self, models: dict, optims: dict, *, device: torch.device, amp: str | None,
                 batch_size: int, frames: int, static: bool = False, capture: bool = False,
                 fallback: bool = False, device_lengths: bool = False, warmup: int = WARMUP):
        if capture and device.type != "cuda":
            raise ValueError("StepRunner: capture=True needs a CUDA device")
        self.models, self.optims = models, optims
        self.device, self.amp = device, amp
        self.static = bool(static or capture)
        self.capture = bool(capture)
        self.device_lengths = bool(capture or (device_lengths and self.static))
        self.frames = int(frames)
        self.warmup = int(warmup)
        self.buffers = StaticBatch(batch_size, frames, device) if self.static else None
        self.graphs: dict = {}       # name -> torch.cuda.CUDAGraph, once captured
        self.graph_losses: dict = {}  # name -> the captured step's loss tensor
        self.full_steps = 0          # full batches stepped (warm-up + captured + replayed)
        self.replays = 0
        self.fallback = bool(fallback)
        self.capture_error: str | None = None
        self.side_stream = torch.cuda.Stream(device) if self.capture else None

    def _eager(self, images, videos, lengths, labels) -> dict:
        return {name: train_step(name, model, self.optims[name], images, videos, lengths, labels,
                                 device=self.device, amp=self.amp, graphs=self.capture)
                for name, model in self.models.items()}

    def step(self, batch) -> dict:
        """One step of every model on `batch` (a MultiModalBatch on the device, lengths on the
        CPU). Returns {name: loss tensor}: under capture these are the graphs' static outputs,
        overwritten by the next replay, so add them up (LossSums.add) before the next step."""
        if not self.static:
            return self._eager(batch.images, batch.videos, batch.lengths, batch.labels)
        if not self.buffers.fits(batch):
            videos = pad_videos(batch.videos, self.frames)
            check_lengths(batch.lengths, int(batch.videos.shape[1]))
            lengths = batch.lengths.to(self.device) if self.device_lengths else batch.lengths
            return self._eager(batch.images, videos, lengths, batch.labels)
        self.buffers.fill(batch)
        b = self.buffers
        # otherwise the models get CPU lengths (their host check needs no sync)
        lengths = b.lengths if self.device_lengths else batch.lengths
        self.full_steps += 1
        if not self.capture:
            return self._eager(b.images, b.videos, lengths, b.labels)
        if self.full_steps <= self.warmup:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                losses = self._eager(b.images, b.videos, lengths, b.labels)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            return losses
        if not self.graphs:
            try:
                self._capture(lengths)
            except Exception as exc:  # noqa: BLE001 - re-raised unless falling back
                if not self.fallback:
                    raise
                return self._give_up_capture(exc, batch)
        for g in self.graphs.values():
            g.replay()
        self.replays += 1
        return dict(self.graph_losses)

    def _give_up_capture(self, exc: BaseException, batch) -> dict:
        """After a failed capture: no graphs from now on; this batch (which the capture did not
        run) and the rest run eagerly on the same padded buffers."""
        self.graphs.clear()
        self.graph_losses.clear()
        for optim in self.optims.values():
            optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        self.capture = False
        self.device_lengths = False
        text = str(exc).strip().splitlines()
        self.capture_error = f"{type(exc).__name__}: {text[0] if text else ''}"
        b = self.buffers
        return self._eager(b.images, b.videos, batch.lengths, b.labels)

    def _capture(self, lengths) -> None:
        """Captures every model's step on the buffers (nothing runs; the replay that follows
        is the step)."""
        b = self.buffers
        torch.cuda.synchronize(self.device)
        for name, model in self.models.items():
            g = torch.cuda.CUDAGraph()
            optim = self.optims[name]
            optim.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool
            with torch.cuda.graph(g):
                with autocast(self.device, self.amp, graphs=True):
                    loss = model_loss(name, model, b.images, b.videos, lengths, b.labels)
                loss.backward()
                optim.step()
            self.graphs[name] = g
            self.graph_losses[name] = loss.detach()


def set_capturable(optim: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """Sets Adam's `capturable` in every param group and moves its step counts where that mode
    keeps them (the device for capturable, the CPU otherwise). load_state_dict restores the
    flag of the run that saved the checkpoint; a resumed run with the other mode calls this."""
    for group in optim.param_groups:
        group["capturable"] = bool(capturable)
    for state in optim.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            where = device if capturable else torch.device("cpu")
            state["step"] = step.to(where, torch.float32)
