"""What `dtl-fast train` reports: the results table, the per-epoch validation line, the machine
description, and the files under --out besides the checkpoint: metrics.json, metrics.csv,
results.md and curves.png (training loss and validation accuracy per epoch, one fixed colour per
model in both panels)."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import warnings
from pathlib import Path

import torch

from dtl_fast.train.checkpoints import atomic_write_bytes, atomic_write_text

# (key, label) of the five evaluated heads, in table order.
HEADS = (
    ("image_cnn", "image-only CNN (baseline)"),
    ("video_baseline", "video-only (baseline)"),
    ("dtl_image", "DTL image head"),
    ("dtl_video", "DTL video head"),
    ("dtl_fused", "DTL fused head"),
)
# the trained models, in the order their losses are listed
MODEL_NAMES = ("dtl", "image_cnn", "video_baseline")
# the training-loss panel's label of each model
MODEL_LABELS = {"dtl": "DTL (dual-task loss)", "image_cnn": "image-only CNN",
                "video_baseline": "video-only"}
# One colour per model, the same in every panel (matplotlib's colour cycle would give the n-th
# line of each panel the n-th colour, so a model's colour would depend on what else is drawn).
MODEL_COLOURS = {"dtl": "tab:green", "image_cnn": "tab:orange", "video_baseline": "tab:blue"}
# the model each head belongs to, and how the DTL heads tell themselves apart (line, marker)
HEAD_MODEL = {"image_cnn": "image_cnn", "video_baseline": "video_baseline",
              "dtl_image": "dtl", "dtl_video": "dtl", "dtl_fused": "dtl"}
HEAD_STYLE = {"dtl_image": ("--", "s"), "dtl_video": (":", "^"), "dtl_fused": ("-", "o")}


def format_table(val: dict | None, test: dict | None) -> str:
    """The results table (markdown): one row per head, accuracies in percent.

    val, test: {head key: accuracy in [0, 1] or None} (None or a missing key prints "-")."""
    def cell(acc):
        return "-" if acc is None else f"{100.0 * acc:.2f} %"
    lines = ["| method | val acc | test acc |", "| --- | ---: | ---: |"]
    for key, label in HEADS:
        lines.append(f"| {label} | {cell((val or {}).get(key))} | {cell((test or {}).get(key))} |")
    return "\n".join(lines)


def format_best_table(best: dict | None, last_val: dict | None, last_test: dict | None,
                      last_epoch: int) -> str:
    """The results table of a run (markdown), one row per head: its model's best validation
    epoch, validation and test accuracy there, and both at the last epoch (`last_epoch`).

    best: metrics["best"] ({"epoch": {model: epoch}, "val_acc": {head: acc}, "test_acc": {head:
    acc}}) or None (no epoch trained in this run's history: the plain last-epoch table)."""
    if best is None:
        return format_table(last_val, last_test)

    def cell(acc):
        return "-" if acc is None else f"{100.0 * acc:.2f} %"
    lines = ["| method | best epoch | val acc (best) | test acc (best) | "
             f"val acc (last, {last_epoch}) | test acc (last) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in HEADS:
        epoch = best["epoch"].get(HEAD_MODEL[key])
        lines.append(f"| {label} | {'-' if epoch is None else epoch} | {cell(best['val_acc'].get(key))} | "
                     f"{cell((best.get('test_acc') or {}).get(key))} | {cell((last_val or {}).get(key))} | "
                     f"{cell((last_test or {}).get(key))} |")
    return "\n".join(lines)


def format_val_line(epoch: int, epochs: int, val: dict) -> str:
    """"epoch 3/20 val acc: image CNN 81.00%, ..." for the heads that have an accuracy."""
    short = {"image_cnn": "image CNN", "video_baseline": "video baseline", "dtl_image": "DTL image",
             "dtl_video": "DTL video", "dtl_fused": "DTL fused"}
    parts = [f"{short[k]} {100 * v:.2f}%" for k, v in ((k, val.get(k)) for k, _ in HEADS) if v is not None]
    return f"epoch {epoch}/{epochs} val acc: " + ", ".join(parts)


def machine_info(device: torch.device) -> dict:
    """The device, library versions and CPU count stored in metrics.json."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": str(torch.__version__),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def write_csv(path: Path, rows: list) -> None:
    """metrics.csv: one row per epoch (the rows of metrics["epochs"]), written atomically."""
    header = ["epoch", "global_step"] + [f"train_loss_{n}" for n in MODEL_NAMES] + \
             [f"val_acc_{k}" for k, _ in HEADS] + ["samples_per_s", "epoch_seconds"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r["epoch"], r["global_step"]] + [r["train_loss"].get(n, "") for n in MODEL_NAMES]
                   + ["" if r["val_acc"].get(k) is None else r["val_acc"][k] for k, _ in HEADS]
                   + [r["samples_per_s"], r["epoch_seconds"]])
    atomic_write_text(path, buf.getvalue())


def plot_curves(rows: list):
    """The matplotlib Figure of curves.png: training loss per model (left) and validation
    accuracy per head (right) over the epochs of `rows` (metrics["epochs"]). Each model has one
    colour in both panels (MODEL_COLOURS); the DTL heads differ by line style and marker. A
    model or head with no value in some row is left out. Needs matplotlib (ImportError without
    it); uses the Agg canvas directly (no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name in MODEL_NAMES:
        ys = [r["train_loss"].get(name) for r in rows]
        if all(y is not None for y in ys):
            ax_loss.plot(epochs, ys, marker="o", color=MODEL_COLOURS[name], label=MODEL_LABELS[name])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    for key, label in HEADS:
        ys = [r["val_acc"].get(key) for r in rows]
        if all(y is not None for y in ys):
            linestyle, marker = HEAD_STYLE.get(key, ("-", "o"))
            ax_acc.plot(epochs, [100 * y for y in ys], linestyle=linestyle, marker=marker,
                        color=MODEL_COLOURS[HEAD_MODEL[key]], label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.legend()
    fig.tight_layout()
    return fig


def write_plot(path: Path, rows: list) -> bool:
    """curves.png (see plot_curves), written atomically. matplotlib is optional: without it this
    warns and returns False."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)
        return False
    fig = plot_curves(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_outputs(out: Path, metrics: dict, plot: bool = False) -> None:
    """metrics.json and metrics.csv under `out`, and curves.png if `plot`."""
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_csv(out / "metrics.csv", metrics["epochs"])
    if plot:  # at the end only: matplotlib costs seconds per figure on a small CPU
        write_plot(out / "curves.png", metrics["epochs"])


def write_results(out: Path, header: str, table: str) -> None:
    """results.md: `header` (a markdown heading and the run's settings) and the results table."""
    atomic_write_text(out / "results.md", header + table + "\n")
