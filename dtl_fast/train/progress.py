"""The training progress bar: dtl_fast._progress's tqdm bar (a line in place on a terminal, the
widget in Jupyter, one line per 30 s in a log), counting samples, and under torchrun only the
real ones: the DistributedSampler's padding is left out, so the count never passes the total."""
from __future__ import annotations

import time

import torch

from dtl_fast._progress import progress_bar


class EpochProgress:
    """One epoch's bar: samples done of `total`, the latest loss, samples per second, elapsed
    and remaining time.

    Args:
        total: the epoch's training samples over all ranks (the train split's length), >= 0.
        desc: the line's prefix, e.g. "epoch 3/20".
        world: torchrun's WORLD_SIZE (1 in one process).
        enabled: False prints nothing (`--no-progress`, and every rank but 0).
        stream: where to write (default: sys.stderr as it is when the bar is made).
        log_interval: seconds between lines when `stream` is not a terminal (None:
            dtl_fast._progress.LOG_INTERVAL, 30 s).

    `update(n)` takes this rank's batch size. DistributedSampler pads every rank's share to
    ceil(total / world) samples by repeating samples at the end of the padded index list, and
    rank r takes positions r, r + world, ...; the ranks step in lockstep (DDP) with equal batch
    sizes. So once this rank has seen k samples, the ranks together have seen the first
    k * world positions, of which min(total, k * world) are real samples: that is the count
    shown, the global number of real samples, never past `total`.
    """

    def __init__(self, total: int, desc: str = "", *, world: int = 1, enabled: bool = True,
                 stream=None, log_interval: float | None = None):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"EpochProgress: total must be an int >= 0, got {total!r}")
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"EpochProgress: world must be an int >= 1, got {world!r}")
        self.total = total
        self.world = world
        self.n = 0  # real samples done, over all ranks
        self._seen = 0  # samples this rank has processed, padded duplicates included
        self.enabled = bool(enabled)
        self._bar = progress_bar(total, desc, unit=" samples", enabled=enabled, stream=stream,
                                 log_interval=log_interval, leave=True)
        # a loss given as a tensor is read (a wait for the device) at most this often
        self._loss_interval = float(getattr(self._bar, "mininterval", 0.1)) if enabled else 0.0
        self._loss_read = None

    def update(self, n: int, loss=None) -> None:
        """Adds this rank's `n` processed samples and, if given, the latest loss: a number, or a
        0-d tensor on the device, which is read only when the bar may draw it (at most once per
        redraw interval, and at the epoch's last batch), never on a disabled bar: reading a GPU
        tensor waits for the GPU."""
        self._seen += int(n)
        done = min(self.total, self._seen * self.world)
        if loss is not None and self.enabled:
            now = time.monotonic()
            if (not isinstance(loss, torch.Tensor) or done >= self.total
                    or self._loss_read is None or now - self._loss_read >= self._loss_interval):
                self._loss_read = now
                self._bar.set_postfix_str(f"loss {float(loss):.4f}", refresh=False)
        if done > self.n:
            self._bar.update(done - self.n)
            self.n = done

    def close(self) -> None:
        """Draws the final state (idempotent)."""
        self._bar.close()

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
