"""A result worth believing: `dtl-fast train --seeds` (mean, std and the paired interval checked
against a direct computation from each seed's metrics.json), Student t quantiles, bad --seeds
values, and best.pt (the best validation epoch of each model, ties to the earliest, consistent
across --resume) on tiny data (CPU)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from dtl_fast import cli
from dtl_fast.train import TrainConfig, evaluate, load_checkpoint, train
from dtl_fast.train.config import parse_seeds
from dtl_fast.train.seeds import summarize, train_seeds
from dtl_fast.train.stats import mean_interval, sample_std, t_cdf, t_quantile
from test_train import TINY, TINY_FLAGS, make_dataset

# ------------------------------------------------------------------------------------------
# Student t

# 0.975 quantiles (two-sided 95 %) from the published tables (R's qt(0.975, df), 10 digits)
T975 = {1: 12.7062047362, 2: 4.3026527297, 3: 3.1824463053, 4: 2.7764451052, 5: 2.5705818356,
        6: 2.4469118511, 9: 2.2621571628, 10: 2.2281388520, 19: 2.0930240544,
        30: 2.0422724563, 100: 1.9839715185}


@pytest.mark.parametrize("dof", sorted(T975))
def test_t_quantile_matches_the_tables(dof):
    assert t_quantile(0.975, dof) == pytest.approx(T975[dof], rel=1e-9, abs=0)
    assert t_quantile(0.025, dof) == pytest.approx(-T975[dof], rel=1e-9, abs=0)
    assert t_cdf(T975[dof], dof) == pytest.approx(0.975, abs=1e-10)


def test_t_cdf_closed_forms_and_other_quantiles():
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 40.0):
        # dof 1 is the Cauchy distribution, dof 2 has a closed form too
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-14)
    assert t_quantile(0.995, 1) == pytest.approx(63.6567411629, rel=1e-9)
    assert t_quantile(0.95, 7) == pytest.approx(1.8945786051, rel=1e-9)
    assert t_quantile(0.5, 3) == 0.0
    # large dof: the normal quantile 1.959964 plus Cornish-Fisher's (z^3 + z) / (4 dof)
    assert t_quantile(0.975, 5000) == pytest.approx(1.959964 + (1.959964**3 + 1.959964) / 20000, abs=1e-6)
    for bad in ((0.975, 0), (1.0, 3), (0.0, 3), (0.5, 2.5)):
        with pytest.raises(ValueError):
            t_quantile(*bad)


def test_mean_interval_by_hand():
    values = [0.02, 0.05, -0.01]
    m = sum(values) / 3
    sd = statistics.stdev(values)
    out = mean_interval(values)
    assert out["mean"] == pytest.approx(m) and out["std"] == pytest.approx(sd)
    assert out["dof"] == 2 and out["t"] == pytest.approx(T975[2], rel=1e-9)
    assert out["low"] == pytest.approx(m - T975[2] * sd / math.sqrt(3))
    assert out["high"] == pytest.approx(m + T975[2] * sd / math.sqrt(3))
    one = mean_interval([0.3])
    assert one["mean"] == 0.3 and one["std"] is None and one["low"] is None and one["t"] is None
    assert sample_std([1.0]) is None


# ------------------------------------------------------------------------------------------
# --seeds parsing

def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("1") == [0]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 5, 3 ,9") == [5, 3, 9]
    for bad, why in (("0,,1", "item 2 is empty"), ("-1", "got '-1'"), ("abc", "got 'abc'"),
                     ("0,1,0", "seed 0 appears twice"), ("0", "got '0'"), ("", "got ''"),
                     ("1,-2", "'-2' is not an integer"), ("1.5", "got '1.5'"), ("4,", "item 2 is empty")):
        with pytest.raises(ValueError, match="--seeds must be") as exc:
            parse_seeds(bad)
        assert why in str(exc.value), (bad, str(exc.value))


@pytest.mark.parametrize("value, why", [("0,,1", "empty"), ("-1", "'-1'"), ("abc", "'abc'"),
                                        ("1,2,1", "twice")])
def test_bad_seeds_flag_is_a_clear_error(value, why, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--seeds", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds: must be N >= 1" in err and why in err, err


def test_seed_and_seeds_together_name_both_flags(tmp_path, capsys):
    assert cli.main(["train", "--seed", "1", "--seeds", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast train: error: --seed and --seeds cannot be combined"), err
    assert not list(tmp_path.iterdir()), "nothing may be trained or written"
    with pytest.raises(ValueError, match="--seeds must not repeat"):
        train_seeds(TrainConfig(out=str(tmp_path)), [1, 1])
    with pytest.raises(ValueError, match="--seeds must be a non-empty list"):
        train_seeds(TrainConfig(out=str(tmp_path)), [])


# ------------------------------------------------------------------------------------------
# a multi-seed run

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    # 14 training samples: batches of 4, 4, 4 and a partial 2
    return make_dataset(tmp_path_factory.mktemp("seeds") / "set", counts=(14, 6, 6))


def _direct(out: Path, seeds: list) -> dict:
    """Mean, std and the paired difference computed here from each seed's metrics.json."""
    runs = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in seeds]
    test = {k: [r["best"]["test_acc"][k] for r in runs] for k in runs[0]["best"]["test_acc"]}
    val = {k: [r["best"]["val_acc"][k] for r in runs] for k in runs[0]["best"]["val_acc"]}
    base = max(("image_cnn", "video_baseline"), key=lambda b: (statistics.mean(val[b]), b == "image_cnn"))
    diff = [f - b for f, b in zip(test["dtl_fused"], test[base])]
    return {"runs": runs, "test": test, "val": val, "base": base, "diff": diff}


def test_seeds_cli_summary_matches_a_direct_computation(tiny_root, tmp_path, capsys):
    out = tmp_path / "multi"
    assert cli.main(["train", "--data", str(tiny_root), "--out", str(out), "--epochs", "2",
                     "--seeds", "0,2", *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert (out / "seed-0" / "best.pt").is_file() and (out / "seed-2" / "checkpoint.pt").is_file()
    assert not (out / "seed-1").exists()
    summary = json.loads((out / "seeds.json").read_text())
    d = _direct(out, [0, 2])
    assert summary["seeds"] == [0, 2] and [r["seed"] for r in summary["runs"]] == [0, 2]
    for key, values in d["test"].items():
        h = summary["heads"][key]["test_best"]
        assert h["values"] == values
        assert h["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert h["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert summary["heads"][key]["val_best"]["mean"] == pytest.approx(statistics.mean(d["val"][key]))
        last = [r["test_acc"][key] for r in d["runs"]]
        assert summary["heads"][key]["test_last"]["values"] == last
    assert summary["best_baseline"] == d["base"]
    diff = summary["difference"]["test_best"]
    m, sd = statistics.mean(d["diff"]), statistics.stdev(d["diff"])
    assert diff["values"] == pytest.approx(d["diff"], abs=1e-12)
    assert diff["mean"] == pytest.approx(m, abs=1e-12) and diff["dof"] == 1
    assert diff["low"] == pytest.approx(m - T975[1] * sd / math.sqrt(2), abs=1e-9)
    assert diff["high"] == pytest.approx(m + T975[1] * sd / math.sqrt(2), abs=1e-9)
    # the printed table and seeds.md carry the same numbers
    md = (out / "seeds.md").read_text()
    fused = summary["heads"]["dtl_fused"]["test_best"]
    cell = f"{100 * fused['mean']:.2f} ± {100 * fused['std']:.2f} %"
    assert cell in printed and cell in md
    if diff["half_width"] is not None:
        assert f"[{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}] points" in md
    assert "best baseline: " in printed and "Student t, 1 dof" in md
    # --resume: a complete seed is re-evaluated, a missing one starts
    shutil.rmtree(out / "seed-2")
    assert cli.main(["train", "--data", str(tiny_root), "--out", str(out), "--epochs", "2",
                     "--seeds", "0,2", "--resume", *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "the run is complete" in printed and "seed 2 has no checkpoint yet; it starts" in printed
    again = json.loads((out / "seeds.json").read_text())
    # the same seed trains bit-identically, so the rerun seed gives the same summary
    assert again["heads"] == summary["heads"] and again["difference"] == summary["difference"]


def test_one_seed_says_the_interval_needs_two(tiny_root, tmp_path, capsys):
    summary = train_seeds(TrainConfig(data=str(tiny_root), out=str(tmp_path), epochs=1, **TINY), [3])
    printed = capsys.readouterr().out
    assert summary["difference"]["test_best"]["half_width"] is None
    assert summary["heads"]["dtl_fused"]["test_best"]["std"] is None
    assert "95 % interval: needs >= 2 seeds" in printed and "it needs >= 2 seeds" in printed


def test_summarize_picks_the_baseline_by_validation_not_test():
    def run(val_img, val_vid, test_img, test_vid, test_fused):
        val = {"image_cnn": val_img, "video_baseline": val_vid, "dtl_image": 0.5, "dtl_video": 0.5,
               "dtl_fused": 0.5}
        test = {"image_cnn": test_img, "video_baseline": test_vid, "dtl_image": 0.5,
                "dtl_video": 0.5, "dtl_fused": test_fused}
        return {"val_acc": val, "test_acc": test,
                "best": {"epoch": {"dtl": 1, "image_cnn": 1, "video_baseline": 1}, "val_acc": val,
                         "test_acc": test}}
    # the video baseline is better on validation, the image CNN on test: video is picked
    s = summarize([0, 1, 2], [run(0.6, 0.7, 0.9, 0.5, 0.60), run(0.6, 0.8, 0.9, 0.55, 0.62),
                              run(0.5, 0.7, 0.9, 0.52, 0.61)])
    assert s["best_baseline"] == "video_baseline"
    diff = s["difference"]["test_best"]
    assert diff["values"] == pytest.approx([0.10, 0.07, 0.09])
    sd = statistics.stdev([0.10, 0.07, 0.09])
    assert diff["low"] == pytest.approx(diff["mean"] - T975[2] * sd / math.sqrt(3))


# ------------------------------------------------------------------------------------------
# best.pt

# validation accuracy per epoch, scripted: DTL's fused head peaks at epochs 2 and 3 (a tie:
# the earliest, 2, wins), the image CNN at epoch 1, the video baseline at epoch 4 (the last)
SCRIPT = {"dtl_fused": [0.5, 0.8, 0.8, 0.6], "dtl_image": [0.1, 0.2, 0.3, 0.4],
          "dtl_video": [0.4, 0.3, 0.2, 0.1], "image_cnn": [0.9, 0.1, 0.1, 0.1],
          "video_baseline": [0.1, 0.2, 0.3, 0.4]}
WANT = {"dtl": 2, "image_cnn": 1, "video_baseline": 4}


@pytest.fixture()
def scripted(monkeypatch):
    """Validation accuracies follow SCRIPT (the test split is evaluated for real), and every
    checkpoint.pt written is recorded: {epoch: {model: state_dict}}."""
    import dtl_fast.train.loop as loop

    real_acc, real_save, real_bar = loop._accuracies, loop.save_checkpoint, loop.EpochProgress
    saved, current = {}, {}

    class Bar(real_bar):  # made once per epoch with desc "epoch E/N": tells the epoch
        def __init__(self, total, desc="", **kwargs):
            current["epoch"] = int(desc.split()[1].split("/")[0])
            super().__init__(total, desc, **kwargs)

    def fake_acc(models, loader, device, amp):
        if len(loader.dataset) != 5:  # the validation split has 5 samples, the test split 6
            return real_acc(models, loader, device, amp)
        return {k: (v[current["epoch"] - 1] if (k in models or k.startswith("dtl_")) else None)
                for k, v in SCRIPT.items()}

    def record(path, state):
        if Path(path).name == "checkpoint.pt":
            saved[state["epoch"]] = {n: {k: v.clone() for k, v in e["state_dict"].items()}
                                     for n, e in state["models"].items()}
        real_save(path, state)

    monkeypatch.setattr(loop, "_accuracies", fake_acc)
    monkeypatch.setattr(loop, "save_checkpoint", record)
    monkeypatch.setattr(loop, "EpochProgress", Bar)
    return saved


@pytest.fixture(scope="module")
def best_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("best") / "set", counts=(8, 5, 6))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_pt_holds_each_model_at_its_best_validation_epoch(scripted, best_root, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train(TrainConfig(data=str(best_root), out=str(out), epochs=4, **TINY))
    assert metrics["best"]["epoch"] == WANT
    best = load_checkpoint(out / "best.pt")
    for name, epoch in WANT.items():
        assert best["models"][name]["epoch"] == epoch
        assert _same_weights(best["models"][name]["state_dict"], scripted[epoch][name]), name
        assert not _same_weights(best["models"][name]["state_dict"], scripted[3 if epoch != 3 else 2][name])
    # validation at the best epoch is the script's value there, for every head of the model
    assert metrics["best"]["val_acc"]["dtl_fused"] == 0.8 and metrics["best"]["val_acc"]["dtl_image"] == 0.2
    assert metrics["best"]["val_acc"]["image_cnn"] == 0.9 and metrics["best"]["val_acc"]["video_baseline"] == 0.4
    printed = capsys.readouterr().out
    assert "a tie goes to the earliest epoch" in printed
    assert "| DTL fused head | 2 | 80.00 % |" in printed and "| image-only CNN (baseline) | 1 | 90.00 % |" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best"]["epoch"] == WANT and saved["best"]["test_acc"] == metrics["best"]["test_acc"]
    # evaluate(best.pt) gives the test accuracies at the best epochs; evaluate(checkpoint.pt) the last
    monkeypatch_free = evaluate(out / "best.pt", best_root, verbose=False)
    assert monkeypatch_free["test_acc"] == metrics["best"]["test_acc"]
    assert monkeypatch_free["epochs"] == WANT
    assert evaluate(out / "checkpoint.pt", best_root, verbose=False)["test_acc"] == metrics["test_acc"]
    # the last epoch's models are what checkpoint.pt holds (the best ones were loaded only to test)
    last = load_checkpoint(out / "checkpoint.pt")
    for name in WANT:
        assert _same_weights(last["models"][name]["state_dict"], scripted[4][name])


def test_resume_keeps_best_pt_consistent(scripted, best_root, tmp_path, capsys):
    full = tmp_path / "full"
    train(TrainConfig(data=str(best_root), out=str(full), epochs=4, **TINY))
    ref = load_checkpoint(full / "best.pt")
    scripted.clear()
    part = tmp_path / "part"
    train(TrainConfig(data=str(best_root), out=str(part), epochs=2, **TINY))
    # an interrupted run resumed: best.pt as if it had run through ...
    train(TrainConfig(data=str(best_root), out=str(part), epochs=4, resume=True, **TINY))
    got = load_checkpoint(part / "best.pt")
    for name in WANT:
        assert got["models"][name]["epoch"] == WANT[name]
        assert _same_weights(got["models"][name]["state_dict"], ref["models"][name]["state_dict"]), name
    # ... and the case that matters: best.pt one improvement behind the checkpoint (epoch 2's
    # checkpoint, where DTL improved, with epoch 1's best.pt): resume takes DTL's from the checkpoint
    scripted.clear()
    crash = tmp_path / "crash"
    train(TrainConfig(data=str(best_root), out=str(crash), epochs=1, **TINY))
    best_after_one = (crash / "best.pt").read_bytes()
    scripted.clear()
    train(TrainConfig(data=str(best_root), out=str(tmp_path / "crash2"), epochs=2, **TINY))
    shutil.copy(tmp_path / "crash2" / "checkpoint.pt", crash / "checkpoint.pt")
    (crash / "best.pt").write_bytes(best_after_one)
    scripted.clear()
    train(TrainConfig(data=str(best_root), out=str(crash), epochs=4, resume=True, **TINY))
    got = load_checkpoint(crash / "best.pt")
    for name in WANT:
        assert _same_weights(got["models"][name]["state_dict"], ref["models"][name]["state_dict"]), name
    # a best.pt that disagrees with the history (image CNN at epoch 3; the history says 1): error
    from dtl_fast.train import save_checkpoint

    other = load_checkpoint(full / "best.pt")
    other["models"]["image_cnn"]["epoch"] = 3
    save_checkpoint(part / "best.pt", other)
    shutil.copy(tmp_path / "crash2" / "checkpoint.pt", part / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"best\.pt holds .* at epoch"):
        train(TrainConfig(data=str(best_root), out=str(part), epochs=4, resume=True, **TINY))
    (part / "best.pt").unlink()
    with pytest.raises(ValueError, match=r"best\.pt is missing"):
        train(TrainConfig(data=str(best_root), out=str(part), epochs=4, resume=True, **TINY))
    capsys.readouterr()


def test_seeds_flag_in_python_m_train(tiny_root, tmp_path):
    from dtl_fast.train import main

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert main(["--data", str(tiny_root), "--out", str(tmp_path), "--epochs", "1",
                     "--seeds", "1", *TINY_FLAGS]) == 0
    assert (tmp_path / "seeds.json").is_file() and (tmp_path / "seed-0" / "best.pt").is_file()
    assert "95 % interval: needs >= 2 seeds" in buf.getvalue()


def test_best_pt_epoch_is_the_same_after_a_resume(scripted, best_root, tmp_path):
    """best.pt's top-level "epoch" is its latest model's best epoch (DTL alone: 2 of 3). A resume
    rewrites best.pt, and used to stamp it with the checkpoint's epoch (3) instead."""
    out = tmp_path / "run"
    config = TrainConfig(data=str(best_root), out=str(out), epochs=3, **dict(TINY, baselines=False))
    with contextlib.redirect_stdout(io.StringIO()):
        train(config)
        assert load_checkpoint(out / "best.pt")["epoch"] == 2
        train(dataclasses.replace(config, resume=True))  # complete: re-evaluates, rewrites best.pt
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 2 and best["models"]["dtl"]["epoch"] == 2
