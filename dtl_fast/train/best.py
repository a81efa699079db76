"""Each model at its best validation epoch: the rule, best.pt and its consistency on --resume.

A model's best epoch is the one with its highest validation accuracy (DTL: its fused head's,
the model's prediction; its image and video heads are reported at that epoch too); a tie goes
to the earliest such epoch. best.pt (beside checkpoint.pt, same format, so `dtl-fast evaluate
OUT/best.pt` works) holds every model's weights at its own best epoch, and per model that epoch
and its validation accuracy.

Order of writes after an epoch: checkpoint.pt, then best.pt (only when a model improved). A
crash between the two leaves best.pt one improvement behind; the epoch it misses is then the
checkpoint's own epoch, so --resume takes that model's best weights from the checkpoint and
rewrites best.pt. Any other disagreement between the metrics history and best.pt is an error.
"""
from __future__ import annotations

from pathlib import Path

from dtl_fast.train.checkpoints import BEST_NAME, CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from dtl_fast.train.reports import HEAD_MODEL

# the head whose validation accuracy picks each model's best epoch
SELECT_HEAD = {"dtl": "dtl_fused", "image_cnn": "image_cnn", "video_baseline": "video_baseline"}
BEST_RULE = ("each model at the epoch of its highest validation accuracy (DTL: its fused head's; "
             "its image and video heads at that epoch too); a tie goes to the earliest epoch")
BEST_RULE_TEXT = ("best epoch: " + BEST_RULE + ". Those weights are in best.pt; "
                  "last epoch: the final weights (checkpoint.pt).")


def best_epochs(rows: list, names) -> dict:
    """{name: (epoch, validation accuracy)} of each model in `names` over the per-epoch `rows`
    (metrics["epochs"]): the earliest epoch with the highest accuracy of SELECT_HEAD[name];
    a model without any accuracy is left out."""
    out = {}
    for name in names:
        head = SELECT_HEAD[name]
        for row in rows:
            acc = row["val_acc"].get(head)
            if acc is not None and (name not in out or acc > out[name][1]):  # ">": earliest wins
                out[name] = (int(row["epoch"]), float(acc))
    return out


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


class BestTracker:
    """Keeps each model's weights at its best epoch so far (a CPU copy) and writes best.pt.

    models: {name: module} (the plain modules, not DDP / compiled wrappers); path: best.pt."""

    def __init__(self, models: dict, path: Path):
        self.models = models
        self.path = Path(path)
        self.epochs: dict = {}   # name -> best epoch
        self.val: dict = {}      # name -> its validation accuracy (SELECT_HEAD)
        self.states: dict = {}   # name -> state_dict (CPU) at that epoch

    def update(self, rows: list) -> list:
        """After the epoch that `rows[-1]` describes: copies the weights of every model whose
        best epoch it now is; returns those models' names."""
        last = int(rows[-1]["epoch"])
        improved = []
        for name, (epoch, acc) in best_epochs(rows, self.models).items():
            if epoch == last and self.epochs.get(name) != epoch:
                self.states[name] = _cpu_copy(self.models[name].state_dict())
                self.epochs[name], self.val[name] = epoch, acc
                improved.append(name)
        return improved

    def save(self, ckpt: dict) -> None:
        """Writes best.pt (atomically) with the classes, config and model configs of `ckpt`
        (the checkpoint just written) and each model's best weights. Its top-level "epoch" is
        the latest of the models' best epochs (the last improvement), not `ckpt`'s: the same
        value whether best.pt was written at that improvement or rewritten by a --resume."""
        models = {name: {"config": ckpt["models"][name]["config"], "state_dict": self.states[name],
                         "epoch": self.epochs[name], "val_acc": self.val[name],
                         "val_head": SELECT_HEAD[name]}
                  for name in self.states}
        save_checkpoint(self.path, {
            "format": CHECKPOINT_FORMAT, "kind": "best", "epoch": max(self.epochs.values()),
            "classes": ckpt["classes"], "config": ckpt["config"], "models": models,
            "best": {name: {"epoch": e, "val_acc": self.val[name], "val_head": SELECT_HEAD[name]}
                     for name, e in self.epochs.items()},
            "rule": BEST_RULE,
        })

    def restore(self, rows: list, state: dict, ckpt_path: Path) -> None:
        """On --resume from `state` (checkpoint.pt, read from ckpt_path): each model's best
        epoch from the metrics history, its weights from best.pt, or from the checkpoint when
        the best epoch is the checkpoint's own; then best.pt is written again. Raises
        ValueError naming best.pt when it is missing or disagrees with the history."""
        ck_epoch = int(state["epoch"])
        saved = None
        for name, (epoch, acc) in best_epochs(rows, self.models).items():
            if epoch == ck_epoch:
                weights = state["models"][name]["state_dict"]
            else:
                if saved is None:
                    if not self.path.is_file():
                        raise ValueError(f"--resume: {self.path} is missing, but {ckpt_path} says "
                                         f"{name}'s best validation epoch was {epoch}; its weights "
                                         "are lost (start afresh without --resume, or another --out)")
                    saved = load_checkpoint(self.path)
                entry = saved["models"].get(name)
                if entry is None or int(entry.get("epoch", -1)) != epoch:
                    raise ValueError(f"--resume: {self.path} holds {name} at epoch "
                                     f"{None if entry is None else entry.get('epoch')}, but the metrics "
                                     f"in {ckpt_path} make epoch {epoch} its best; they belong to "
                                     "different runs (start afresh without --resume)")
                weights = entry["state_dict"]
            self.states[name] = _cpu_copy(weights)
            self.epochs[name], self.val[name] = epoch, acc
        if self.states:
            self.save(state)

    def load_into(self, models: dict) -> None:
        """Loads each model's best weights into `models` (in place)."""
        for name, m in models.items():
            if name in self.states:
                m.load_state_dict(self.states[name])

    def summary(self, rows: list) -> dict:
        """metrics["best"] without test_acc: the rule, {model: best epoch}, and the validation
        accuracy of every head at its model's best epoch (from `rows`)."""
        by_epoch = {int(r["epoch"]): r for r in rows}
        val = {}
        for head, model in HEAD_MODEL.items():
            if model in self.epochs:
                val[head] = by_epoch[self.epochs[model]]["val_acc"].get(head)
        return {"rule": BEST_RULE, "epoch": dict(self.epochs), "val_acc": val}


def best_state_epochs(state: dict) -> dict | None:
    """{model: epoch} of a best.pt (None for a checkpoint.pt)."""
    if state.get("kind") != "best":
        return None
    return {name: int(entry["epoch"]) for name, entry in state["models"].items()}


