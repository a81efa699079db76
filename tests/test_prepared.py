"""`dtl-fast data prepare` and PreparedSplit: the prepared data set gives the same samples, in the
same order, bitwise the same tensors as MultiModalFolder on the raw files (frame folders and
.mp4 clips, resize and subsampling included), refuses settings it was not prepared with,
detects truncated or changed files, never loses data when writing, and trains to the same
metrics. Also a smoke run of bench/bench_data.py."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dtl_fast import cli
from dtl_fast.data import BadSampleError, MultiModalFolder, collate_multimodal, is_prepared, open_split
from dtl_fast.data import prepared as P
from _helpers import encode_clip

av = pytest.importorskip("av")

CLASSES = ("a", "b", "c")
# validation has no class "a" folder: with classes=None its labels differ from train's order
LAYOUT = {"train": (9, CLASSES), "validation": (4, ("b", "c")), "test": (3, CLASSES)}
STATS = dict(mean=(0.3, 0.5, 0.45), std=(0.2, 0.31, 0.27))
OPTS = dict(image_size=8, frame_size=(6, 10), max_frames=4)


def _codec() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001
            continue
    pytest.skip("PyAV has no libx264 / mpeg4 encoder")


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    encode_clip(path, frames, _codec(), rate=8)


def make_raw(root: Path, seed: int = 0) -> Path:
    """Images 14x20 (resized on read); clips alternate: a folder of 1-6 PNG frames 18x14, or an
    .mp4 of 3-10 frames 16x16; max_frames=4 subsamples the longer ones."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, (n, classes) in LAYOUT.items():
        for i in range(n):
            label = classes[i % len(classes)]
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
            if k % 2:
                _write_mp4(folder / f"s{i}.mp4", rng.integers(0, 256, (int(rng.integers(3, 11)), 16, 16, 3),
                                                               dtype=np.uint8))
            else:
                (folder / f"s{i}").mkdir()
                for t in range(int(rng.integers(1, 7))):
                    Image.fromarray(rng.integers(0, 256, (18, 14, 3), dtype=np.uint8)).save(
                        folder / f"s{i}" / f"{t}.png")
            k += 1
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_raw(tmp_path_factory.mktemp("raw") / "set")


@pytest.fixture(scope="module")
def prep(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    P.prepare(raw, out, workers=2, progress=False, **OPTS)
    return out


def _same_item(a, b, what):
    assert a[2] == b[2] and isinstance(b[2], int), (what, a[2], b[2])
    for x, y, name in ((a[0], b[0], "image"), (a[1], b[1], "video")):
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, (what, name, x.shape, y.shape)
        assert torch.equal(x, y), (what, name, (x - y).abs().max().item())


def _splits(root, **kw):
    out, classes = {}, None
    for split in LAYOUT:
        out[split] = open_split(root, split, classes=classes, **kw)
        classes = list(out[split].classes)
    return out


@pytest.mark.parametrize("own_classes", [False, True], ids=["train-classes", "classes-None"])
def test_prepared_equals_raw_bitwise(raw, prep, own_classes):
    kw = dict(OPTS, **STATS)
    for split in LAYOUT:
        classes = None if own_classes else list(CLASSES)
        r = MultiModalFolder(raw, split, classes=classes, **kw)
        p = open_split(prep, split, classes=classes, **kw)
        assert isinstance(p, P.PreparedSplit) and is_prepared(prep) and not is_prepared(raw)
        assert p.samples == r.samples and len(p) == len(r) == LAYOUT[split][0]
        assert p.classes == r.classes and p.class_to_idx == r.class_to_idx
        assert p.num_frames == r.num_frames and p.skipped == r.skipped == []
        assert max(r.num_frames) > OPTS["max_frames"], "the data must exercise subsampling"
        for i in range(len(r)):
            _same_item(r[i], p[i], (split, i))
        _same_item(r[len(r) - 1], p[-1], (split, -1))
        order = list(np.random.default_rng(1).permutation(len(r)))
        for i, item in zip(order, p.__getitems__(order)):
            _same_item(r[i], item, (split, "batched", i))
    if own_classes:  # validation's own classes: b is label 0 there, 1 with train's classes
        assert open_split(prep, "validation", **OPTS).classes == ["b", "c"]
    with pytest.raises(IndexError):
        p[len(p)]


def test_grayscale_in_process_prepare_and_cli(raw, tmp_path, capsys):
    out = tmp_path / "gray"
    rc = cli.main(["data", "prepare", str(raw), str(out), "--image-size", "12", "--max-frames", "3",
                   "--channels", "1", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "train on it with: dtl-fast train --data" in printed and "--channels 1" in printed
    m = json.loads((out / "prepared.json").read_text())
    assert m["format"] == "dtl_fast.prepared" and m["channels"] == 1 and m["image_size"] == [12, 12]
    assert m["classes"] == list(CLASSES) and m["source"] == str(raw.resolve())
    kw = dict(image_size=12, max_frames=3, channels=1)  # ImageNet stats, averaged for gray
    r, p = _splits(raw, **kw), _splits(out, **kw)
    for split in LAYOUT:
        assert p[split].samples == r[split].samples
        for i in range(len(r[split])):
            _same_item(r[split][i], p[split][i], (split, i))
    # arrays on disk: uint8 [N, H, W, 1] images and the clips' frames end to end
    images = np.load(out / "train" / "images.npy", mmap_mode="r")
    frames = np.load(out / "train" / "frames.npy", mmap_mode="r")
    lengths = np.load(out / "train" / "lengths.npy")
    assert images.dtype == np.uint8 and images.shape == (9, 12, 12, 1)
    assert frames.shape == (int(lengths.sum()), 12, 12, 1) and lengths.max() <= 3
    # an existing prepared OUT is not redone without --overwrite; the error names OUT
    rc = cli.main(["data", "prepare", str(raw), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "--overwrite" in err


def test_loader_workers_map_their_own_files(raw, prep):
    kw = dict(OPTS, **STATS)
    r = MultiModalFolder(raw, "train", **kw)
    p = open_split(prep, "train", **kw)
    p[0]  # maps the arrays in this process
    clone = pickle.loads(pickle.dumps(p))
    assert clone._maps is None, "the mapped arrays must not travel with the dataset"
    _same_item(r[3], clone[3], "unpickled")
    frames = clone._maps[1]  # a read-only view of the mapped file, not a copy
    assert isinstance(frames.base, np.memmap) and frames.base.mode == "r" and not frames.flags.writeable
    raw_batches = list(DataLoader(r, batch_size=4, collate_fn=collate_multimodal))
    prep_batches = list(DataLoader(p, batch_size=4, num_workers=2, collate_fn=collate_multimodal))
    assert len(raw_batches) == len(prep_batches) == 3
    for a, b in zip(raw_batches, prep_batches):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("change,flag,asked,prepared", [
    (dict(image_size=9), "--image-size", "9", "8"),
    (dict(frame_size=None), "--frame-size", "8", "6x10"),
    (dict(max_frames=5), "--max-frames", "5", "4"),
    (dict(channels=1), "--channels", "1", "3"),
])
def test_other_settings_are_refused_naming_the_flag(prep, change, flag, asked, prepared):
    with pytest.raises(ValueError) as info:
        open_split(prep, "train", **dict(OPTS, **change))
    msg = str(info.value)
    assert f"({flag}) {asked} asked, {prepared} prepared" in msg and f"Pass {flag} {prepared}" in msg, msg


def test_bad_options_splits_and_classes(prep):
    with pytest.raises(FileNotFoundError, match="'train2' is not in the prepared data set"):
        open_split(prep, "train2", **OPTS)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\]"):
        open_split(prep, "train", classes=["a", "b"], **OPTS)
    with pytest.raises(TypeError, match="unknown option"):
        open_split(prep, "train", imagesize=8)
    with pytest.raises(ValueError, match="std must hold finite positive"):
        open_split(prep, "train", std=(0.2, 0.0, 0.2), **OPTS)
    # a different label order is a remapping, not an error
    p = open_split(prep, "train", classes=["c", "b", "a"], **OPTS)
    q = open_split(prep, "train", **OPTS)
    assert [p.classes[p[i][2]] for i in range(len(p))] == [q.classes[q[i][2]] for i in range(len(q))]


def test_truncated_or_changed_files_are_errors(prep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prep, copy)  # new modification times, same bytes: accepted after hashing
    os.utime(copy / "train" / "frames.npy", ns=(1, 1))
    open_split(copy, "train", **OPTS)[0]

    frames = copy / "train" / "frames.npy"
    data = frames.read_bytes()
    frames.write_bytes(data[:-100])
    with pytest.raises(P.PreparedDataError, match="truncated") as info:
        open_split(copy, "train", **OPTS)
    assert str(frames) in str(info.value)

    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, one pixel changed
    frames.write_bytes(bytes(flipped))
    with pytest.raises(P.PreparedDataError, match="contents changed") as info:
        open_split(copy, "train", **OPTS)
    assert str(frames) in str(info.value)
    frames.write_bytes(data)

    labels = copy / "test" / "labels.npy"
    labels.unlink()
    with pytest.raises(P.PreparedDataError, match="labels array is missing"):
        open_split(copy, "test", **OPTS)

    manifest = copy / "prepared.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(m, version=99)))
    with pytest.raises(P.PreparedDataError, match="version 99"):
        open_split(copy, "train", **OPTS)
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(P.PreparedDataError, match="not JSON"):
        open_split(copy, "train", **OPTS)


def test_bad_samples_fail_or_are_skipped_as_on_raw_files(tmp_path):
    raw = make_raw(tmp_path / "raw", seed=3)
    bad = raw / "train" / "b" / "s1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    with pytest.raises(BadSampleError) as info:
        P.prepare(raw, out, progress=False, **OPTS)
    assert str(bad) in str(info.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["raw"], "nothing left behind"

    with pytest.warns(UserWarning, match="skipped 1 bad sample"):  # the check says so, as for training
        P.prepare(raw, out, on_bad_sample="skip", progress=False, **OPTS)
    with pytest.raises(BadSampleError) as info:
        open_split(out, "train", **OPTS)  # on_bad_sample="error", as MultiModalFolder would
    assert str(bad) in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = MultiModalFolder(raw, "train", on_bad_sample="skip", **OPTS)
    with pytest.warns(UserWarning, match="left out"):
        p = open_split(out, "train", on_bad_sample="skip", **OPTS)
    assert p.skipped == r.skipped and len(p.skipped) == 1 and p.samples == r.samples
    for i in range(len(r)):
        _same_item(r[i], p[i], i)


def test_out_is_protected_and_replaced_atomically(raw, tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to write into OUT") as info:
        P.prepare(raw, foreign, overwrite=True, progress=False, **OPTS)
    assert str(foreign) in str(info.value) and (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="inside the raw split folder"):
        P.prepare(raw, raw / "train" / "prepared", progress=False, **OPTS)

    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited: its leftover temp folder is removed by the next prepare
    (tmp_path / f".out.preparing-{gone.pid}-dead").mkdir()
    P.prepare(raw, out, progress=False, **OPTS)
    assert not (tmp_path / f".out.preparing-{gone.pid}-dead").exists()
    with pytest.raises(ValueError, match="already a prepared data set"):
        P.prepare(out, tmp_path / "again", progress=False, **OPTS)
    with pytest.raises(FileExistsError, match="--overwrite"):
        P.prepare(raw, out, progress=False, image_size=10)

    calls = []

    def dies(task):  # the second chunk fails: the old OUT must survive whole
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    real = P._decode_chunk
    monkeypatch.setattr(P, "_CHUNK", 2)
    monkeypatch.setattr(P, "_decode_chunk", dies)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(raw, out, overwrite=True, progress=False, image_size=10)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"], "a temp folder was left"
    assert json.loads((out / "prepared.json").read_text())["image_size"] == [8, 8]
    open_split(out, "test", **OPTS)[0]

    P.prepare(raw, out, overwrite=True, progress=False, image_size=10, max_frames=2)
    p = open_split(out, "train", image_size=10, max_frames=2)
    assert p[0][0].shape == (3, 10, 10) and int(p.lengths.max()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_a_split_opened_before_an_overwrite_refuses_the_new_files(raw, tmp_path):
    """A DataLoader worker (or the next epoch's) maps the arrays after the split was opened: if
    `prepare --overwrite` replaced them meanwhile, the old index must not read the new frames."""
    out = tmp_path / "out"
    P.prepare(raw, out, progress=False, **OPTS)
    ds = open_split(out, "train", **OPTS)
    first = ds[0]
    P.prepare(raw, out, overwrite=True, progress=False, image_size=8, frame_size=(6, 10), max_frames=2)
    _same_item(ds[0], first, "already mapped in this process")  # the old files stay mapped
    ds._maps = None  # as in a new worker process
    with pytest.raises(P.PreparedDataError, match="replaced or changed since this split was opened"):
        ds[0]
    assert open_split(out, "train", image_size=8, frame_size=(6, 10), max_frames=2)[0][1].shape[0] <= 2


@pytest.mark.slow
def test_training_on_prepared_data_matches_raw(raw, tmp_path):
    from dtl_fast.train import TrainConfig, evaluate, train

    tiny = dict(epochs=2, batch_size=4, lr=5e-3, image_size=8, max_frames=3, width=8, hidden_size=8,
                dim=8, num_heads=2, num_layers=1, backend="auto", progress=False, seed=3)
    out = tmp_path / "prepared"
    assert cli.main(["data", "prepare", str(raw), str(out), "--image-size", "8", "--max-frames", "3",
                     "--workers", "2", "--no-progress"]) == 0
    runs = {}
    for name, data in (("raw", raw), ("prepared", out)):
        with contextlib.redirect_stdout(io.StringIO()):
            runs[name] = train(TrainConfig(data=str(data), out=str(tmp_path / f"run-{name}"), **tiny))
    a, b = runs["raw"], runs["prepared"]
    assert a["test_acc"] == b["test_acc"] and a["val_acc"] == b["val_acc"]
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    ckpt = tmp_path / "run-prepared" / "checkpoint.pt"
    scores = [evaluate(ckpt, str(data), backend="auto", batch_size=4, verbose=False) for data in (raw, out)]
    assert scores[0]["test_acc"] == scores[1]["test_acc"] == b["test_acc"]
    assert scores[0]["val_acc"] == scores[1]["val_acc"]
    with pytest.raises(ValueError, match="--max-frames"):
        train(TrainConfig(data=str(out), out=str(tmp_path / "run-bad"), **dict(tiny, max_frames=4)))


@pytest.mark.slow
def test_bench_data_quick_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_data as BD
    import harness as H

    args = argparse.Namespace(device="cpu", quick=True, out=str(tmp_path / "results"), no_plot=True,
                              time_budget=None, cold_cache=False, threads=None, run_id="smoke",
                              clips=40, sizes="16x8", loader_workers="0,2", loader_seconds=0.2,
                              prepare_workers=2, check_workers=0, cache=str(tmp_path / "cache"),
                              no_progress=True, batch=8)
    rows = BD.run(args)
    assert [r["status"] for r in rows] == ["ok"] * len(rows), [(r["mode"], r["status"]) for r in rows]
    modes = [(r["mode"], r["provider"], r["variant"]) for r in rows]
    assert modes[:4] == [("check-first", "raw", "check-workers=0"), ("check-second", "raw", "check-workers=0"),
                         ("prepare", "prepared", "img16-f8"), ("open", "prepared", "img16-f8")]
    loaders = [r for r in rows if r["mode"] == "loader"]
    assert {(r["provider"], r["variant"]) for r in loaders} == {
        (p, f"img16-f8-w{w}") for p in ("raw", "prepared") for w in (0, 2)}
    for r in loaders:
        ex = H.row_extra(r)
        assert ex["samples_per_s"] > 0 and ex["batches"] >= 10 and ex["batch"] == 8
        if r["provider"] == "prepared":
            assert "bitwise equal" in ex["gate"] and H.fnum(r["ratio"]) > 0
    assert len(H.read_rows(tmp_path / "results" / "data.csv")) == len(rows)
    figs = BD.acceptance(rows, "cpu")
    assert len(figs) == 3 and all(f["number"] > 0 for f in figs), figs
    # the synthetic set is cached: a second call finds it
    root, info = BD.synthesise(tmp_path / "cache", 40, progress=False)
    assert info["clips"] == 40 and len(list((root / "train").rglob("*.mp4"))) == 32


def test_prepare_flags_default_to_trains():
    from dtl_fast.train import TrainConfig

    args = cli.build_parser().parse_args(["data", "prepare", "DIR", "OUT"])
    d = TrainConfig()
    for name in ("image_size", "frame_size", "max_frames", "channels", "on_bad_sample", "workers"):
        assert getattr(args, name) == getattr(d, name), name
    assert args.overwrite is False and args.progress is True
