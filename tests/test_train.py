"""`dtl-fast train` / dtl_fast.train on a tiny generated image + video data set (CPU): outputs,
bit-identical resume, DDP on gloo vs one process (and its output: rank 0 only, real sample
counts), bad samples, clear errors, evaluate, the tqdm progress bar, the plot's colours and the
atomic writes."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtl_fast import cli
from dtl_fast.train import (
    HEADS,
    TrainConfig,
    evaluate,
    format_table,
    load_checkpoint,
    save_checkpoint,
    train,
    train_seeds,
)
from dtl_fast.train.progress import EpochProgress
from dtl_fast.train.reports import format_best_table

CLASSES = ("circle", "cross", "square")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_KEYS = [k for k, _ in HEADS]


def _pattern(label: int, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """A class-dependent RGB pattern plus noise: easy enough that 2 epochs lower the loss."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    img[..., label] = np.clip(img[..., label].astype(int) + 150, 0, 255).astype(np.uint8)
    return img


def make_dataset(root: Path, counts=(12, 3, 3), seed: int = 0) -> Path:
    """root/{train,validation,test}/<class>/<i>.png plus a folder <i>/ of 1-3 frame PNGs; counts
    are samples per split (spread over the classes)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "validation", "test"), counts):
        for i in range(n):
            label = i % len(CLASSES)
            folder = root / split / CLASSES[label]
            (folder / f"s{i}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pattern(label, rng)).save(folder / f"s{i}.png")
            for t in range(int(rng.integers(1, 4))):
                Image.fromarray(_pattern(label, rng)).save(folder / f"s{i}" / f"{t:02d}.png")
    return root


TINY = dict(batch_size=4, lr=5e-3, image_size=12, max_frames=3, width=8, hidden_size=8, dim=8,
            num_heads=2, num_layers=1, backend="auto", progress=False)
TINY_FLAGS = ["--batch-size", "4", "--lr", "5e-3", "--image-size", "12", "--max-frames", "3",
              "--width", "8", "--hidden-size", "8", "--dim", "8", "--num-heads", "2",
              "--num-layers", "1", "--backend", "auto", "--no-progress"]


def _states(ckpt: Path) -> dict:
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by the tests below."""
    out = tmp_path_factory.mktemp("full")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = train(TrainConfig(data=str(data_root), out=str(out), epochs=2, **TINY))
    return out, metrics, stdout.getvalue()


def test_two_epochs_lower_the_loss_and_write_everything(full_run):
    out, metrics, printed = full_run
    rows = metrics["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for name in ("dtl", "image_cnn", "video_baseline"):
        assert rows[1]["train_loss"][name] < rows[0]["train_loss"][name], (name, rows)
    for name in ("metrics.json", "metrics.csv", "curves.png", "results.md", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
    assert (out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_acc"] == metrics["test_acc"]
    for key in HEAD_KEYS:
        assert 0.0 <= saved["test_acc"][key] <= 1.0, key
        assert 0.0 <= saved["val_acc"][key] <= 1.0, key
    assert len(saved["epochs"]) == 2 and saved["epochs"][1]["samples_per_s"] > 0
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["cpu_count"] >= 1
    assert saved["total_seconds"] > 0 and saved["config"]["epochs"] == 2
    csv_lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,")
    # the table: each head at its model's best validation epoch and at the last one
    table = format_best_table(metrics["best"], metrics["val_acc"], metrics["test_acc"], 2)
    assert table in printed and table in (out / "results.md").read_text()
    assert "| method | best epoch | val acc (best) | test acc (best) | val acc (last, 2) |" in table
    assert set(saved["best"]["epoch"]) == {"dtl", "image_cnn", "video_baseline"}
    for key in HEAD_KEYS:
        assert 0.0 <= saved["best"]["test_acc"][key] <= 1.0, key
    assert "cuda graphs off" in printed
    assert "epoch 2/2 val acc:" in printed and "backend: auto" in printed
    state = _states(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["global_step"] == 6 and state["classes"] == list(CLASSES)
    assert set(state["models"]) == {"dtl", "image_cnn", "video_baseline"}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}


def test_resume_after_epoch_one_is_bit_identical(full_run, data_root, tmp_path, capsys):
    out_full = full_run[0]
    train(TrainConfig(data=str(data_root), out=str(tmp_path), epochs=1, **TINY))
    first = _states(tmp_path / "checkpoint.pt")
    assert first["epoch"] == 1
    train(TrainConfig(data=str(data_root), out=str(tmp_path), epochs=2, resume=True, **TINY))
    assert "continuing from" in capsys.readouterr().out
    a, b = _states(out_full / "checkpoint.pt"), _states(tmp_path / "checkpoint.pt")
    assert b["epoch"] == 2 and b["global_step"] == a["global_step"]
    for name in a["models"]:
        sa, sb = a["models"][name]["state_dict"], b["models"][name]["state_dict"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
        oa, ob = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert oa.keys() == ob.keys()
        for i in oa:
            for k in oa[i]:
                assert torch.equal(oa[i][k], ob[i][k]), f"{name} optimizer state {i}.{k}"
    # the resumed run carries epoch 1's metrics over
    assert [r["epoch"] for r in b["metrics"]["epochs"]] == [1, 2]
    assert b["metrics"]["epochs"][0]["train_loss"] == a["metrics"]["epochs"][0]["train_loss"]


def test_resume_complete_run_reevaluates_and_mismatch_is_named(full_run, data_root, tmp_path, capsys):
    out, metrics, _ = full_run
    again = train(TrainConfig(data=str(data_root), out=str(out), epochs=2, resume=True, **TINY))
    assert "the run is complete" in capsys.readouterr().out
    assert again["test_acc"] == metrics["test_acc"]
    with pytest.raises(ValueError, match=r"--width: checkpoint 8, this run 16"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=3, resume=True, **dict(TINY, width=16)))
    with pytest.raises(ValueError, match="--batch-size"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=3, resume=True,
                          **dict(TINY, batch_size=2)))
    with pytest.raises(ValueError, match="--resume: no checkpoint at"):
        train(TrainConfig(data=str(data_root), out=str(tmp_path / "new"), resume=True, **TINY))


def test_evaluate_prints_the_same_table(full_run, data_root, capsys):
    out, metrics, _ = full_run
    assert cli.main(["evaluate", str(out / "checkpoint.pt"), "--data", str(data_root),
                     "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert format_table(metrics["val_acc"], metrics["test_acc"]) in printed
    res = evaluate(out / "checkpoint.pt", data_root, verbose=False)
    assert res["test_acc"] == metrics["test_acc"] and res["epoch"] == 2


def test_evaluate_class_mismatch_and_bad_checkpoint(full_run, data_root, tmp_path):
    out = full_run[0]
    other = make_dataset(tmp_path / "other", counts=(3, 3, 3))
    (other / "test" / "circle").rename(other / "test" / "ellipse")
    with pytest.raises(ValueError, match="ellipse"):
        evaluate(out / "checkpoint.pt", other, verbose=False)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate(tmp_path / "nope.pt", data_root, verbose=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "checkpoint.pt").read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="bad.pt"):
        evaluate(bad, data_root, verbose=False)


def test_bad_sample_error_before_training_or_skipped(tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "set", counts=(12, 3, 3))
    corrupt = root / "validation" / "cross" / "s1.png"
    corrupt.write_bytes(b"not a png at all")
    import dtl_fast.train.graphs as tr

    steps = []
    real_step = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    from dtl_fast.data import BadSampleError

    with pytest.raises(BadSampleError, match="s1.png"):
        train(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, **TINY))
    assert not steps, "trained before checking the files"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1,
                                    on_bad_sample="skip", amp="bf16", **dict(TINY, baselines=False)))
    assert steps
    assert [s["path"] for s in metrics["skipped"]] == [str(corrupt)]
    assert str(corrupt) in capsys.readouterr().out
    assert metrics["test_acc"]["image_cnn"] is None and metrics["test_acc"]["dtl_fused"] is not None
    assert metrics["backend"]["amp"] == "bf16" and math.isfinite(metrics["epochs"][0]["train_loss"]["dtl"])
    # and the CLI turns the error into exit status 2 naming the file
    assert cli.main(["train", "--data", str(root), "--out", str(tmp_path / "r2"), "--epochs", "1",
                     *TINY_FLAGS]) == 2
    assert "s1.png" in capsys.readouterr().err


@pytest.mark.parametrize("change, flag", [
    (dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch-size"), (dict(lr=0.0), "--lr"),
    (dict(lr=float("nan")), "--lr"), (dict(amp="fp16"), "--amp"), (dict(workers=-1), "--workers"),
    (dict(device="tpu"), "--device"), (dict(on_bad_sample="ignore"), "--on-bad-sample"),
    (dict(backend="fast"), "--backend"), (dict(dim=9), "--dim"), (dict(channels=2), "--channels"),
])
def test_bad_settings_name_the_flag(change, flag, tmp_path):
    with pytest.raises(ValueError, match=flag):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), **change))


def test_bad_data_out_device_and_world_size(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--data .*not a folder"):
        train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="missing the split folder.*validation"):
        train(TrainConfig(data=str(tmp_path / "flat"), out=str(tmp_path / "o")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--out .*not writable"):
        train(TrainConfig(data=str(tmp_path / "flat"), out=str(blocker / "sub")))
    with pytest.raises(ValueError, match=f"--out {re.escape(str(blocker))} is a file, not a folder"):
        train(TrainConfig(data=str(tmp_path / "flat"), out=str(blocker)))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            train(TrainConfig(data=str(tmp_path / "flat"), out=str(tmp_path / "o"), device="cuda"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 64 .*divisible by the 3 processes"):
        train(TrainConfig(data=str(tmp_path / "flat"), out=str(tmp_path / "o")))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(full_run, data_root, tmp_path):
    """2 ranks on gloo with a per-rank batch of 2 == one process with the global batch of 4
    (12 training samples: every global batch is full, so the ranks' shares are equal). The one
    process is `full_run`, with the same flags."""
    flags = ["--data", str(data_root), "--epochs", "2", *TINY_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DTL_FAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "dtl_fast.train", *flags,
                          "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 processes (DDP)" in res.stdout
    assert res.stdout.count("epoch 2/2 val acc") == 1, "only rank 0 prints"
    a, b = _states(tmp_path / "ddp" / "checkpoint.pt"), _states(full_run[0] / "checkpoint.pt")
    assert a["global_step"] == 6 and b["global_step"] == 6
    # Float sums in another order change gradients by ~1e-7 relative; Adam divides by sqrt(v),
    # so in the few weights whose gradients are tiny that becomes ~1e-5 in the update. A wrong
    # split of the batches or unsynchronised ranks moves every weight by ~lr: the mean check.
    diffs = []
    for name in b["models"]:
        sa, sb = a["models"][name]["state_dict"], b["models"][name]["state_dict"]
        assert sa.keys() == sb.keys()
        for k in sb:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=5e-5, msg=f"{name}.{k}")
            diffs.append((sa[k].double() - sb[k].double()).abs().flatten())
    mean_diff = torch.cat(diffs).mean().item()
    assert mean_diff < 1e-6, mean_diff
    ja = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ja["world_size"] == 2
    np.testing.assert_allclose(ja["epochs"][1]["train_loss"]["dtl"],
                               b["metrics"]["epochs"][1]["train_loss"]["dtl"], rtol=1e-5)


def _torchrun(flags: list, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DTL_FAST_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "dtl_fast.train", *flags],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_ddp_output_comes_from_rank_zero_once_with_real_sample_counts(tmp_path):
    """11 training samples on 2 ranks (the sampler pads each rank's share to 6): the bar ends at
    11/11, never past it, and is drawn once; a skipped file is reported once; a bad file with
    --on-bad-sample error stops both ranks, and the error is printed once."""
    root = make_dataset(tmp_path / "odd", counts=(11, 4, 3))
    corrupt = root / "validation" / "cross" / "s1.png"
    corrupt.write_bytes(b"not a png at all")
    flags = [f for f in TINY_FLAGS if f != "--no-progress"]
    res = _torchrun(["--data", str(root), "--epochs", "1", "--on-bad-sample", "skip", *flags,
                     "--out", str(tmp_path / "run")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # stderr is a pipe here: the bar's lines, one per redraw, without carriage returns
    bar = [line for line in res.stderr.split("\n") if "epoch 1/1:" in line]
    counts = _bar_counts("\n".join(bar), 11)
    assert counts and counts[-1] == 11 and max(counts) == 11, res.stderr[-3000:]
    assert counts.count(0) == 1, "one bar (rank 0's), not one per rank: " + res.stderr[-3000:]
    assert not [line for line in bar if "\r" in line]
    assert res.stdout.count("epoch 1/1 val acc") == 1
    assert res.stdout.count(f"{corrupt}: ") == 1, res.stdout
    assert res.stderr.count("skipped 1 bad sample") == 1, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [s["path"] for s in metrics["skipped"]] == [str(corrupt)]
    # the throughput counts the 11 real samples too, not the 12 the padded shares hold
    row = metrics["epochs"][0]
    assert row["samples_per_s"] * row["epoch_seconds"] == pytest.approx(11), row

    res = _torchrun(["--data", str(root), "--epochs", "1", *TINY_FLAGS, "--out", str(tmp_path / "err")])
    assert res.returncode != 0
    assert res.stderr.count("dtl_fast.train: error:") == 1, res.stderr[-3000:]
    assert str(corrupt) in res.stderr
    assert not (tmp_path / "err" / "checkpoint.pt").exists()


def test_atomic_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "dtl_fast.train/1", "x": torch.arange(3)})
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"format": "dtl_fast.train/1", "x": lambda: 0})  # not picklable
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    # a failure at the rename (after the temp file was written and synced): old file intact,
    # the temp file removed
    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(path, {"format": "dtl_fast.train/1", "x": torch.arange(5)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    with pytest.raises(ValueError, match="not a `dtl-fast train` checkpoint"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def test_plot_without_matplotlib_warns(tmp_path, monkeypatch):
    from dtl_fast.train import reports

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rows = [{"epoch": 1, "train_loss": {"dtl": 1.0}, "val_acc": {"dtl_fused": 0.5}}]
    with pytest.warns(UserWarning, match="matplotlib"):
        assert reports.write_plot(tmp_path / "curves.png", rows) is False
    assert not (tmp_path / "curves.png").exists()


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def _bar_counts(text: str, total: int) -> list:
    """The sample counts of the progress lines `n/total` in `text`, in order."""
    return [int(n) for n in re.findall(rf"\| *(\d+)/{total} \[", text)]


def test_progress_bar_modes():
    # not a terminal (a log file, a pipe): every redraw its own line, no carriage return
    s = _Stream(False)
    bar = EpochProgress(10, "epoch 1/2", stream=s, log_interval=0.0)
    bar.update(4, loss=1.5)
    bar.update(6, loss=0.25)
    bar.close()
    bar.close()
    out = s.getvalue()
    lines = out.splitlines()
    assert "\r" not in out and all(line.startswith("epoch 1/2:") for line in lines), out
    assert _bar_counts(out, 10)[:3] == [0, 4, 10] and _bar_counts(out, 10)[-1] == 10, out
    assert "loss 1.5000" in lines[1] and "samples/s" in lines[1]
    assert "loss 0.2500" in lines[-1]
    # the default interval (30 s): the first line and the final one, not a line per batch
    s = _Stream(False)
    bar = EpochProgress(1000, "epoch 1/1", stream=s)
    for _ in range(250):
        bar.update(4, loss=1.0)
    bar.close()
    assert _bar_counts(s.getvalue(), 1000) == [0, 1000], s.getvalue()
    # a terminal: tqdm redraws in place and ends the line when done
    t = _Stream(True)
    bar = EpochProgress(4, "e", stream=t)
    bar.update(2)
    bar.close()
    assert t.getvalue().startswith("\re:") and t.getvalue().endswith("\n") and "2/4" in t.getvalue()
    off = _Stream(False)
    bar = EpochProgress(4, stream=off, enabled=False)
    bar.update(4, loss=1.0)
    bar.close()
    assert off.getvalue() == ""
    for bad in (dict(total=-1), dict(total=4, world=0), dict(total=4.0)):
        with pytest.raises(ValueError, match="total|world"):
            EpochProgress(**bad)


def test_progress_counts_real_samples_under_ddp():
    """11 samples on 2 ranks with 2 per rank and step: DistributedSampler pads each share to 6,
    so rank 0 sees 2, 4, 6 samples; the ranks together 4, 8 and then 11 real ones (not 12)."""
    s = _Stream(False)
    bar = EpochProgress(11, "epoch 1/1", world=2, stream=s, log_interval=0.0)
    for _ in range(3):
        bar.update(2)
    bar.close()
    assert bar.n == 11
    assert _bar_counts(s.getvalue(), 11)[:4] == [0, 4, 8, 11]
    assert max(_bar_counts(s.getvalue(), 11)) == 11


def test_train_progress_in_a_log_is_a_few_lines_with_the_real_count(data_root, tmp_path, monkeypatch):
    import dtl_fast._progress

    # an interval no epoch reaches, however loaded the machine: the first and the final line
    monkeypatch.setattr(dtl_fast._progress, "LOG_INTERVAL", 3600.0)
    err, out = io.StringIO(), io.StringIO()  # StringIO is not a terminal, like a log file
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        train(TrainConfig(data=str(data_root), out=str(tmp_path), epochs=2,
                          **dict(TINY, progress=True, baselines=False)))
    text = err.getvalue()
    for epoch in (1, 2):
        # split at newlines only: a redraw by carriage return must show up as "\r" in a line
        lines = [line for line in text.split("\n") if f"epoch {epoch}/2:" in line]
        counts = _bar_counts("\n".join(lines), 12)
        assert not [line for line in lines if "\r" in line], lines
        assert counts == [0, 12], text
        assert "loss " in lines[-1] and "samples/s" in lines[-1]
    # --no-progress: no bar at all
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        train(TrainConfig(data=str(data_root), out=str(tmp_path / "quiet"), epochs=1,
                          **dict(TINY, baselines=False)))
    assert "epoch 1/1:" not in err.getvalue()


def test_curves_use_one_colour_per_model_in_both_panels():
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from dtl_fast.train.reports import plot_curves

    def rows(baselines):
        models = ("dtl", "image_cnn", "video_baseline") if baselines else ("dtl",)
        heads = HEAD_KEYS if baselines else ["dtl_image", "dtl_video", "dtl_fused"]
        return [{"epoch": e, "train_loss": {m: 2.0 / (e + i) for i, m in enumerate(models)},
                 "val_acc": {k: min(1.0, 0.2 * e + 0.05 * i) for i, k in enumerate(heads)}}
                for e in (1, 2, 3)]

    def colours(ax):
        return {line.get_label(): to_rgba(line.get_color()) for line in ax.get_lines()}

    ax_loss, ax_acc = plot_curves(rows(True)).axes
    loss, acc = colours(ax_loss), colours(ax_acc)
    assert len(loss) == 3 and len(acc) == 5, (loss, acc)
    dtl, image, video = loss["DTL (dual-task loss)"], loss["image-only CNN"], loss["video-only"]
    assert len({dtl, image, video}) == 3, loss
    assert acc["image-only CNN (baseline)"] == image, (loss, acc)
    assert acc["video-only (baseline)"] == video, (loss, acc)
    for head in ("DTL image head", "DTL video head", "DTL fused head"):
        assert acc[head] == dtl, (head, loss, acc)
    # the three DTL heads share a colour, so they differ by line style and marker
    styles = {(line.get_linestyle(), line.get_marker()) for line in ax_acc.get_lines()
              if line.get_label().startswith("DTL")}
    assert len(styles) == 3
    # and a model keeps its colour when the others are not drawn (no colour cycle)
    ax_loss, ax_acc = plot_curves(rows(False)).axes
    assert set(colours(ax_loss).values()) == {dtl} and set(colours(ax_acc).values()) == {dtl}


def test_no_data_builds_the_demo_set_once_in_the_cache(tmp_path, monkeypatch, capsys):
    """Without --data: the bundled digits set in $DTL_FAST_CACHE/demo-digits-seed<seed> (a small
    build here: samples_per_class=3), built once and reused."""
    import dtl_fast.data as data

    real, calls = data.build_demo_dataset, []

    def small(root, *, seed=0, **kwargs):
        calls.append((Path(root), seed))
        return real(root, seed=seed, samples_per_class=3, **kwargs)

    monkeypatch.setattr(data, "build_demo_dataset", small)
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=1, seed=5, **dict(TINY, baselines=False))
    metrics = train(cfg)
    root = tmp_path / "cache" / "demo-digits-seed5"
    assert calls == [(root, 5)]
    assert metrics["config"]["data"] == str(root.resolve())
    assert metrics["classes"] == [str(d) for d in range(10)]
    assert "the bundled digits demo data set" in capsys.readouterr().out
    stamp = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*.png"))
    train(TrainConfig(out=str(tmp_path / "run"), epochs=1, seed=5, resume=True, **dict(TINY, baselines=False)))
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*.png")) == stamp


def test_no_data_with_a_foreign_folder_in_the_cache_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # The cache folder holds something that is not a demo build: nothing is replaced, and the
    # command line says so (exit 2), not a FileExistsError traceback.
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path / "cache"))
    foreign = tmp_path / "cache" / "demo-digits-seed0" / "mine.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("keep")
    rc = cli.main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert rc == 2 and "demo-digits-seed0" in capsys.readouterr().err
    assert foreign.read_text() == "keep"


@pytest.mark.gpu
def test_train_resume_evaluate_on_cuda_fused_bf16(data_root, tmp_path):
    # the whole loop on a GPU: pinned loaders, bf16 autocast, the fused kernels, the CUDA RNG
    # state in the checkpoint, resume and evaluate on the device
    base = dict(TINY, backend="fused", device="cuda", amp="bf16", data=str(data_root))
    first = train(TrainConfig(**dict(base, epochs=1, out=str(tmp_path / "r"))))
    assert len(first["epochs"]) == 1
    res = train(TrainConfig(**dict(base, epochs=2, out=str(tmp_path / "r"), resume=True)))
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["epoch"] == 2
    for name, entry in state["models"].items():
        for k, v in entry["state_dict"].items():
            assert torch.isfinite(v.float()).all(), (name, k)
    ev = evaluate(tmp_path / "r" / "checkpoint.pt", data_root, device="cuda",
                  batch_size=TINY["batch_size"], verbose=False)
    assert ev["test_acc"] == pytest.approx(res["test_acc"])


def test_normalisation_and_frame_size_flags_reach_the_data(data_root):
    from dtl_fast.train import build_parser, config_from_args
    from dtl_fast.train.datasets import open_datasets
    from dtl_fast.train.distributed import Dist

    args = build_parser().parse_args(["--data", str(data_root), "--mean", "0.5", "--std", "0.25",
                                      "--frame-size", "10", "--image-size", "12"])
    cfg = config_from_args(args)
    cfg.validate()
    ds = open_datasets(Path(data_root), cfg, Dist(), splits=("train",))["train"]
    assert torch.equal(torch.as_tensor(ds.mean).flatten(), torch.full((3,), 0.5))
    assert torch.equal(torch.as_tensor(ds.std).flatten(), torch.full((3,), 0.25))
    image, video, _ = ds[0]
    assert image.shape[-2:] == (12, 12) and video.shape[-2:] == (10, 10)
    # a pixel in [0, 255] normalised with mean 0.5, std 0.25 lies in [-2, 2]
    assert image.min() >= -2.0 - 1e-6 and image.max() <= 2.0 + 1e-6 and image.min() < -1.0
    for flags, what in ((["--std", "0"], "--std"), (["--mean", "1", "2"], "--mean"),
                        (["--frame-size", "0"], "--frame-size")):
        bad = config_from_args(build_parser().parse_args(["--data", str(data_root)] + flags))
        with pytest.raises(ValueError, match=what):
            bad.validate()


def test_an_error_of_one_rank_alone_is_printed_by_that_rank(monkeypatch, capsys):
    """Rank 0 prints what every rank raised (once); an error only this rank raised (a file that
    went bad mid-epoch here) is printed by this rank, or nobody would ever see it."""
    from dtl_fast.train import entry
    from dtl_fast.train.distributed import Dist

    for rank, everywhere, shown in ((0, True, True), (0, False, True), (1, True, False), (1, False, True)):
        monkeypatch.setattr(entry, "dist_from_env", lambda rank=rank: Dist(world=2, rank=rank))
        exc = ValueError("bad file x.png")
        if everywhere:
            exc.raised_on_every_rank = True
        entry._report("dtl-fast train", exc)
        err = capsys.readouterr().err
        assert ("bad file x.png" in err) == shown, (rank, everywhere, err)
        assert ("[rank 1]" in err) == (rank == 1 and shown)


# ----------------------------------------------------------------------------------------------
# refusals and messages found by the s26 review (each failed before its fix)

@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_out_inside_a_split_folder_of_data_is_refused(split, tmp_path, capsys):
    """--out is made before the data is read: inside DATA/<split>/ it would become a class."""
    root = make_dataset(tmp_path / "set", counts=(3, 3, 3))
    before = sorted(p.name for p in (root / split).iterdir())
    out = root / split / "run1"
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(out))} lies inside the {split} "
                                         rf"split folder of --data {re.escape(str(root))}"):
        train(TrainConfig(data=str(root), out=str(out), epochs=1, **TINY))
    with pytest.raises(ValueError, match="--out .* lies inside"):  # --seeds: OUT/seed-<s> too
        train_seeds(TrainConfig(data=str(root), out=str(root / split), epochs=1, **TINY), [0, 1])
    assert cli.main(["train", "--data", str(root), "--out", str(out / "deeper"), "--epochs", "1",
                     *TINY_FLAGS]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert sorted(p.name for p in (root / split).iterdir()) == before, "a class folder was made"


def test_out_is_not_the_data_nor_inside_the_cached_demo_set(tmp_path, monkeypatch):
    # --out equal to --data would write results.md / metrics.json among the data set's files;
    # without --data the cached demo set is the data, and its split folders are off limits too.
    root = make_dataset(tmp_path / "set", counts=(3, 3, 3))
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(root))} is --data"):
        train(TrainConfig(data=str(root), out=str(root), epochs=1, **TINY))
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "demo-digits-seed3" / "train" / "run"
    with pytest.raises(ValueError, match="lies inside the train split folder of the demo data in"):
        train(TrainConfig(out=str(out), epochs=1, seed=3, **TINY))
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_one_class_data_set_names_data_and_the_class_folders(tmp_path):
    root = make_dataset(tmp_path / "one", counts=(3, 3, 3))
    for split in ("train", "validation", "test"):
        for name in ("cross", "square"):
            shutil.rmtree(root / split / name)
    with pytest.raises(ValueError, match=rf"--data {re.escape(str(root))}: .*train holds 1 class "
                                         r"folder\(s\) \['circle'\].*at least 2"):
        train(TrainConfig(data=str(root), out=str(tmp_path / "o"), epochs=1, **TINY))


def test_resume_refuses_fewer_epochs_and_a_weights_only_checkpoint(full_run, data_root, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)  # 2 epochs
    saved = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"already holds 2 epochs, more than --epochs 1; pass --epochs 2"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=1, resume=True, **TINY))
    assert (out / "metrics.json").read_text() == saved, "metrics.json was rewritten"
    # best.pt copied over checkpoint.pt: weights only, no optimizer state (was a KeyError)
    shutil.copyfile(out / "best.pt", out / "checkpoint.pt")
    ckpt = out / "checkpoint.pt"
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))} holds model weights only.*"
                                         r"resume needs the checkpoint.pt.*dtl-fast evaluate"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=3, resume=True, **TINY))
    assert cli.main(["train", "--data", str(data_root), "--out", str(out), "--epochs", "3",
                     "--resume", *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast train: error: --resume:") and "best.pt" in err


def test_a_new_run_over_an_earlier_one_says_so(full_run, data_root, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    train(TrainConfig(data=str(data_root), out=str(out), epochs=1, **dict(TINY, baselines=False)))
    printed = capsys.readouterr().out
    assert f"--out {out} holds an earlier run: replacing it (pass --resume to continue it)" in printed
    train(TrainConfig(data=str(data_root), out=str(tmp_path / "fresh"), epochs=1,
                      **dict(TINY, baselines=False)))
    assert "holds an earlier run" not in capsys.readouterr().out


def test_evaluate_uses_the_runs_on_bad_sample_and_takes_the_flag(tmp_path, capsys):
    """A run trained with --on-bad-sample skip is evaluated with skip (it used to be forced to
    "error", with no flag to change it); --on-bad-sample error overrides; --no-progress."""
    from dtl_fast.data import BadSampleError

    root = make_dataset(tmp_path / "set", counts=(6, 3, 3))
    corrupt = root / "test" / "cross" / "s1.png"
    corrupt.write_bytes(b"not a png at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1,
                                    on_bad_sample="skip", **dict(TINY, baselines=False)))
        ckpt = tmp_path / "run" / "checkpoint.pt"
        res = evaluate(ckpt, root, verbose=False)
        assert res["test_acc"] == metrics["test_acc"]
        assert [s["path"] for s in res["skipped"]] == [str(corrupt)]
        with pytest.raises(BadSampleError, match="s1.png"):
            evaluate(ckpt, root, verbose=False, on_bad_sample="error")
        capsys.readouterr()
        assert cli.main(["evaluate", str(ckpt), "--data", str(root), "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert "skipped 1 bad sample" in captured.out and "checking" not in captured.err
        assert cli.main(["evaluate", str(ckpt), "--data", str(root), "--on-bad-sample", "error",
                         "--no-progress"]) == 2
        assert "s1.png" in capsys.readouterr().err
        assert cli.main(["evaluate", str(ckpt), "--data", str(root), "--on-bad-sample", "skip"]) == 0
        assert "checking" in capsys.readouterr().err  # the bars are on by default


def test_evaluate_on_prepared_data_of_other_sizes_names_the_checkpoints_sizes(full_run, data_root,
                                                                              tmp_path):
    """evaluate has no --image-size / --max-frames (the sizes are the checkpoint's): its error
    must not tell the user to pass them."""
    from dtl_fast.data import prepare

    prep = tmp_path / "prep16"
    prepare(data_root, prep, image_size=16, max_frames=4, channels=3, workers=0, progress=False)
    with pytest.raises(ValueError) as exc:
        evaluate(full_run[0] / "checkpoint.pt", prep, verbose=False)
    msg = str(exc.value)
    assert "Pass --" not in msg, msg
    assert "--image-size 16 prepared, 12 in the checkpoint" in msg, msg
    assert "--max-frames 4 prepared, 3 in the checkpoint" in msg, msg
    assert f"dtl-fast data prepare {data_root.resolve()} NEW_OUT --image-size 12 --max-frames 3" in msg, msg


# ----------------------------------------------------------------------------------------------
# found by the review after those (each failed before its fix)

def _two_ranks(flags: list, timeout: int = 300) -> list:
    """`python -m dtl_fast.train FLAGS` as ranks 0 and 1 of a gloo group, started without
    torchrun (which kills the other ranks once one fails): each rank's own exit status shows.
    [(returncode, stdout, stderr)] by rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2")
    env.pop("DTL_FAST_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, "-m", "dtl_fast.train", *flags],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _copy_with_best_epoch_one(full_run, out: Path) -> None:
    """full_run's 2 epochs in `out`, its history edited so that DTL's best validation epoch is
    1: resuming needs DTL's epoch-1 weights from best.pt (the checkpoint holds epoch 2's)."""
    shutil.copytree(full_run[0], out)
    state = load_checkpoint(out / "checkpoint.pt")
    for row, acc in zip(state["metrics"]["epochs"], (1.0, 0.0)):
        row["val_acc"]["dtl_fused"] = acc
    save_checkpoint(out / "checkpoint.pt", state)


@pytest.mark.slow
def test_ddp_resume_with_best_pt_missing_stops_every_rank_with_one_message(full_run, data_root,
                                                                           tmp_path):
    """Rank 0 alone reads best.pt; it used to raise there alone, while rank 1 went on into DDP
    and died with a gloo "Connection closed by peer" traceback (on NCCL: a hang)."""
    out = tmp_path / "run"
    _copy_with_best_epoch_one(full_run, out)
    (out / "best.pt").unlink()
    ranks = _two_ranks(["--data", str(data_root), "--out", str(out), "--epochs", "3", "--resume",
                        *TINY_FLAGS])
    (rc0, _, err0), (rc1, _, err1) = ranks
    assert (rc0, rc1) == (2, 2), err0[-3000:] + err1[-3000:]
    assert err0.count("dtl_fast.train: error: --resume:") == 1 and "best.pt is missing" in err0, err0
    assert err1 == "", "rank 1 prints nothing (rank 0 reports it): " + err1[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_resume_with_best_pt_missing_is_still_an_error_in_one_process(full_run, data_root, tmp_path):
    out = tmp_path / "run"
    _copy_with_best_epoch_one(full_run, out)
    (out / "best.pt").unlink()
    with pytest.raises(ValueError, match=r"best\.pt is missing, but .* dtl's best validation epoch was 1"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=3, resume=True, **TINY))


@pytest.mark.parametrize("package", ["torchvision", "av"])
def test_evaluate_without_an_optional_package_is_a_clear_error(package, full_run, data_root, tmp_path,
                                                               monkeypatch, capsys):
    """`dtl-fast train` prints a missing torchvision / PyAV as `error: ... pip install ...`,
    exit status 2; evaluate let the RuntimeError out as a traceback. torchvision: a resnet18
    checkpoint; PyAV: a clip stored as an .mp4 file."""
    if package == "torchvision":
        state = load_checkpoint(full_run[0] / "checkpoint.pt")
        for entry in state["models"].values():
            entry["config"]["encoder"] = "resnet18"
        checkpoint, root, named = tmp_path / "resnet18.pt", data_root, "resnet18"
        save_checkpoint(checkpoint, state)
    else:
        checkpoint = full_run[0] / "checkpoint.pt"
        root = make_dataset(tmp_path / "clips", counts=(3, 3, 3))
        shutil.rmtree(root / "test" / "cross" / "s1")  # its clip becomes a video file
        named = root / "test" / "cross" / "s1.mp4"
        named.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    assert cli.main(["evaluate", str(checkpoint), "--data", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast evaluate: error: ") and f"pip install {package}" in err, err
    assert str(named) in err and "Traceback" not in err


def test_resume_takes_the_api_tuple_and_the_cli_list_of_mean_std(data_root, tmp_path, capsys):
    """--mean / --std from the Python API (a tuple) and from the command line (a list) are the
    same setting; --resume compared (0.5,) with [0.5] and refused."""
    from dtl_fast.train.checkpoints import check_resume

    out = tmp_path / "run"
    small = dict(TINY, baselines=False)
    train(TrainConfig(data=str(data_root), out=str(out), epochs=1, mean=(0.5,), std=(0.25,), **small))
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["mean"] == [0.5] and state["config"]["std"] == [0.25]
    assert json.loads((out / "metrics.json").read_text())["config"]["std"] == [0.25]
    flags = [*TINY_FLAGS, "--no-baselines"]
    assert cli.main(["train", "--data", str(data_root), "--out", str(out), "--epochs", "2",
                     "--resume", "--mean", "0.5", "--std", "0.25", *flags]) == 0, capsys.readouterr().err
    assert "continuing from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    # one value for every channel is the same as that value per channel (ints are floats) ...
    state = load_checkpoint(out / "checkpoint.pt")
    same = TrainConfig(**dict(state["config"], mean=(0.5, 0.5, 0.5), std=[0.25] * 3, epochs=3))
    check_resume(state, same, out / "checkpoint.pt")
    # ... and another value is still refused, naming the flag
    assert cli.main(["train", "--data", str(data_root), "--out", str(out), "--epochs", "3",
                     "--resume", "--mean", "0.4", "--std", "0.25", *flags]) == 2
    err = capsys.readouterr().err
    assert "--mean: checkpoint [0.5], this run [0.4]" in err, err
    # a checkpoint of the old code (a tuple saved) still resumes with the command line's list
    state["config"]["mean"], state["config"]["std"] = (0.5,), (0.25,)
    check_resume(state, TrainConfig(**dict(state["config"], mean=[0.5], std=[0.25], epochs=3)),
                 out / "checkpoint.pt")


class _Foreign:
    """Something a checkpoint never holds (a module-level class: torch.save pickles it)."""


def test_load_checkpoint_names_a_folder_and_a_file_that_is_not_a_checkpoint(full_run, data_root,
                                                                            tmp_path, capsys):
    out = full_run[0]
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(out))} is a folder, not a "
                                         rf"checkpoint file; pass {re.escape(str(out / 'checkpoint.pt'))} "
                                         r"\(the last epoch\) or .*best\.pt"):
        load_checkpoint(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a folder, .*OUT/checkpoint\.pt"):
        load_checkpoint(tmp_path / "empty")

    foreign = tmp_path / "foreign.pt"  # a zip of torch.save, with a class weights_only refuses
    torch.save({"format": "dtl_fast.train/1", "x": _Foreign()}, foreign)
    for path in (out / "metrics.json", out / "curves.png", foreign):
        with pytest.raises(ValueError) as exc:
            load_checkpoint(path)
        msg = str(exc.value)
        assert msg.startswith(f"checkpoint {path} is not a `dtl-fast train` checkpoint"), msg
        # torch's advice (load with weights_only=False) is wrong for these, and no flag does it
        assert "weights_only" not in msg, msg
    assert cli.main(["evaluate", str(out), "--data", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dtl-fast evaluate: error: checkpoint {out} is a folder"), err

    # a checkpoint whose pickle bytes are damaged is damaged, not "another kind of file"
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(out / "checkpoint.pt") as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data[:2] + bytes([215]) + data[3:]  # an opcode the unpickler lacks
            zout.writestr(item, data)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(damaged))} could not be read "
                                         r"\(damaged: .*\); is it a complete"):
        load_checkpoint(damaged)


def test_resume_refuses_another_amp(full_run, data_root, tmp_path):
    """bf16 autocast changes the training arithmetic: a run half in bf16, half in float32 is
    neither, and metrics.json would record one of them. It continued silently."""
    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    with pytest.raises(ValueError, match=r"--amp: checkpoint None, this run 'bf16'"):
        train(TrainConfig(data=str(data_root), out=str(out), epochs=3, resume=True, amp="bf16", **TINY))
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_resume_may_change_on_bad_sample_but_not_the_samples(tmp_path, capsys):
    """--on-bad-sample may change on --resume (it only decides what a bad file does), but a
    resume whose usable samples differ from the checkpoint's run is refused: a file that went
    bad, skipped now, silently changed the batches."""
    root = make_dataset(tmp_path / "set", counts=(6, 3, 3))
    out = tmp_path / "run"
    small = dict(TINY, baselines=False)
    train(TrainConfig(data=str(root), out=str(out), epochs=1, **small))  # --on-bad-sample error
    # the same samples: skip is allowed (the run is complete: it re-evaluates)
    train(TrainConfig(data=str(root), out=str(out), epochs=1, resume=True, on_bad_sample="skip", **small))
    assert "the run is complete" in capsys.readouterr().out
    bad = root / "train" / "square" / "s2.png"
    bad.write_bytes(b"not a png at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"--resume: the data set's usable samples differ .*now "
                                             rf"bad and skipped: {re.escape(str(bad))}"):
            train(TrainConfig(data=str(root), out=str(out), epochs=2, resume=True,
                              on_bad_sample="skip", **small))
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
