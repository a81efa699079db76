"""`dtl-fast train --seeds 0,1,2` (or `--seeds N`): one run per seed, and a result worth believing.

Each seed is an ordinary `dtl-fast train --seed S` run into OUT/seed-S/ (its own checkpoint.pt,
best.pt, metrics; resumable on its own). Without --data each seed also builds its own demo data
set (the demo data's split and noise follow --seed), so the spread over seeds covers the split
as well as the initialisation and the batch order.

The summary (printed, and written to OUT/seeds.json and OUT/seeds.md):
- every head's validation and test accuracy, mean +- sample standard deviation (n - 1) over the
  seeds, at each model's best validation epoch (best.pt) and at the last epoch;
- the best baseline: the one with the higher mean validation accuracy at its best epoch (the
  test split plays no part in choosing it);
- the paired difference DTL fused head - best baseline in test accuracy, per seed (both trained
  on the same seed's data and batches), its mean and the 95 % Student t interval of the mean
  (n - 1 degrees of freedom, dtl_fast.train.stats). One seed gives no interval: it needs an
  estimate of the spread, so >= 2 seeds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dtl_fast.train.checkpoints import CHECKPOINT_NAME, atomic_write_text, check_out_writable
from dtl_fast.train.config import TrainConfig
from dtl_fast.train.distributed import dist_from_env, resolve_device
from dtl_fast.train.reports import HEAD_MODEL, HEADS
from dtl_fast.train.stats import mean, mean_interval, sample_std

BASELINES = ("image_cnn", "video_baseline")
FUSED = "dtl_fused"
LABELS = dict(HEADS)
# (key in the summary, where it comes from in a run's metrics)
KINDS = (("val_best", ("best", "val_acc")), ("test_best", ("best", "test_acc")),
         ("val_last", ("val_acc",)), ("test_last", ("test_acc",)))


def check_seeds(seeds) -> list[int]:
    """`seeds` as a list of distinct integers >= 0 (at least one); ValueError naming --seeds."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"--seeds must be a list of distinct integers >= 0, got {seeds!r}")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must not repeat a seed, got {seeds!r}")
    return seeds


def seed_dir(out, seed: int) -> Path:
    """Where seed `seed` of a multi-seed run writes: OUT/seed-<seed>."""
    return Path(out) / f"seed-{seed}"


def train_seeds(config: TrainConfig, seeds) -> dict:
    """Trains `config` once per seed (config.seed ignored), seed S into OUT/seed-S/, and returns
    the summary (see summarize) that it also prints and writes to OUT/seeds.json and
    OUT/seeds.md. With config.resume each seed resumes from its own checkpoint, and a seed
    with none yet starts from scratch. Raises ValueError naming the flag for bad input (the
    seeds, or any TrainConfig setting) before anything trains."""
    from dtl_fast.train.loop import train

    seeds = check_seeds(seeds)
    config = dataclasses.replace(config)
    config.validate()
    dist_info = dist_from_env()
    out = Path(config.out)
    if dist_info.main:
        check_out_writable(out)
    initialised = False
    if dist_info.active and not torch.distributed.is_initialized():
        # one process group for all the seeds (train() then neither makes nor ends one)
        device = resolve_device(config.device, dist_info.local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised = True
    try:
        runs = []
        for i, seed in enumerate(seeds):
            cfg = dataclasses.replace(config, seed=seed, out=str(seed_dir(out, seed)))
            if dist_info.main:
                print(f"\n=== seed {seed} ({i + 1} of {len(seeds)}) -> {cfg.out}", flush=True)
            if cfg.resume and not (Path(cfg.out) / CHECKPOINT_NAME).is_file():
                cfg.resume = False
                if dist_info.main:
                    print(f"--resume: seed {seed} has no checkpoint yet; it starts", flush=True)
            runs.append(train(cfg))
    finally:
        if initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    summary = summarize(seeds, runs, out=str(out), data=config.data)
    if dist_info.main:
        text = format_summary(summary)
        print("\n" + text, flush=True)
        atomic_write_text(out / "seeds.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / "seeds.md", "# dtl-fast train, several seeds\n\n" + text + "\n")
    return summary


def _pick(metrics: dict, path: tuple) -> dict:
    value = metrics
    for key in path:
        value = (value or {}).get(key)
    return value or {}


def summarize(seeds: list, runs: list, *, out: str | None = None, data: str | None = None) -> dict:
    """The multi-seed summary of the runs' metrics (train()'s return values, in seed order).

    Returns {"seeds", "out", "data", "runs": [{"seed", "best_epoch", "val_best", "test_best",
    "val_last", "test_last"}], "heads": {head: {kind: {"mean", "std", "values"}}} (kinds
    val_best, test_best, val_last, test_last; std None for one seed; a head that a run lacks is
    left out), "best_baseline", "best_baseline_rule", "difference": {kind: mean_interval of the
    per-seed fused - best baseline differences, with "values"} for test_best and test_last}.
    Accuracies are fractions in [0, 1], as in metrics.json."""
    rows = []
    for seed, m in zip(seeds, runs):
        row = {"seed": seed, "best_epoch": dict(_pick(m, ("best", "epoch")))}
        for kind, path in KINDS:
            row[kind] = dict(_pick(m, path))
        rows.append(row)
    heads = {}
    for key, _ in HEADS:
        entry = {}
        for kind, _ in KINDS:
            values = [r[kind].get(key) for r in rows]
            if values and all(v is not None for v in values):
                entry[kind] = {"mean": mean(values), "std": sample_std(values), "values": values}
        if entry:
            heads[key] = entry
    baselines = [b for b in BASELINES if "val_best" in heads.get(b, {})]
    best_baseline = None
    if baselines:
        # the higher mean validation accuracy; an exact tie goes to the first in table order
        best_baseline = max(baselines, key=lambda b: (heads[b]["val_best"]["mean"], -baselines.index(b)))
    difference = {}
    if best_baseline is not None and FUSED in heads:
        for kind in ("test_best", "test_last"):
            if kind in heads[FUSED] and kind in heads[best_baseline]:
                values = [f - b for f, b in zip(heads[FUSED][kind]["values"],
                                                heads[best_baseline][kind]["values"])]
                difference[kind] = dict(mean_interval(values, 0.95), values=values)
    return {"seeds": list(seeds), "out": out, "data": data, "runs": rows, "heads": heads,
            "best_baseline": best_baseline,
            "best_baseline_rule": "the baseline with the higher mean validation accuracy at its "
                                  "best epoch (ties: the image-only CNN)",
            "difference": difference}


def _pct(stat: dict | None) -> str:
    if stat is None:
        return "-"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.2f} %"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f} %"


def _points(v: float) -> str:
    return f"{100 * v:+.2f}"


def format_summary(summary: dict) -> str:
    """The multi-seed report (markdown): the mean +- std table, the per-seed table and the
    paired difference with its interval."""
    seeds = summary["seeds"]
    n = len(seeds)
    lines = [f"seeds {', '.join(map(str, seeds))} ({n} run{'s' if n != 1 else ''}, one folder each: "
             f"seed-<s>/); accuracy mean ± standard deviation over the seeds"
             + (" (sample std, n - 1)" if n >= 2 else " (one seed: no std, it needs >= 2 seeds)")
             + "; best = each model at its best validation epoch (ties: the earliest), its "
               "weights in seed-<s>/best.pt; last = after the final epoch", ""]
    lines += ["| method | val acc (best) | test acc (best) | val acc (last) | test acc (last) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key, label in HEADS:
        h = summary["heads"].get(key, {})
        name = f"**{label}**" if key == FUSED else label
        lines.append(f"| {name} | {_pct(h.get('val_best'))} | {_pct(h.get('test_best'))} | "
                     f"{_pct(h.get('val_last'))} | {_pct(h.get('test_last'))} |")
    lines += ["", "per seed, test accuracy at the best epoch (best epoch in brackets):", "",
              "| seed | " + " | ".join(label for _, label in HEADS) + " |",
              "| ---: |" + " ---: |" * len(HEADS)]
    for r in summary["runs"]:
        cells = []
        for key, _ in HEADS:
            v, e = r["test_best"].get(key), r["best_epoch"].get(HEAD_MODEL[key])
            cells.append("-" if v is None else f"{100 * v:.2f} % ({e})")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    lines.append("")
    base = summary["best_baseline"]
    if base is None or not summary["difference"]:
        lines.append("paired difference: needs the baselines (trained without --no-baselines)")
        return "\n".join(lines)
    val_means = {b: summary["heads"][b]["val_best"]["mean"] for b in BASELINES if b in summary["heads"]}
    lines.append(f"best baseline: {LABELS[base]}, by mean validation accuracy at its best epoch ("
                 + ", ".join(f"{LABELS[b]} {100 * v:.2f} %" for b, v in val_means.items())
                 + "; the test split plays no part in the choice)")
    for kind, what in (("test_best", "test accuracy at the best epoch"),
                       ("test_last", "test accuracy at the last epoch")):
        d = summary["difference"].get(kind)
        if d is None:
            continue
        per_seed = ", ".join(_points(v) for v in d["values"])
        text = (f"DTL fused head − {LABELS[base]}, {what}, paired by seed: "
                f"mean {_points(d['mean'])} points (per seed {per_seed})")
        if d["half_width"] is None:
            text += "; 95 % interval: needs >= 2 seeds"
        else:
            text += (f"; 95 % interval [{_points(d['low'])}, {_points(d['high'])}] points "
                     f"(Student t, {d['dof']} dof, t = {d['t']:.3f})")
            if d["low"] > 0:
                text += ": DTL ahead"
            elif d["high"] < 0:
                text += ": the baseline ahead"
            else:
                text += ": the interval includes 0, no clear difference at this many seeds"
        lines.append(("**" + text + "**") if kind == "test_best" else text)
    return "\n".join(lines)
