"""The training step of `dtl-fast train` with CUDA graphs and torch.compile: on the CPU, the
capture-independent parts (static buffers, padding to --max-frames, on-device loss sums, the
step on the buffers) against the plain eager loop, bit for bit; the choice of graphs and its
record; --compile on the CPU. On CUDA (`gpu`): captured steps against eager ones, and resume
with graphs on."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dtl_fast.train import TrainConfig, load_checkpoint, train
from dtl_fast.train.checkpoints import seed_everything
from dtl_fast.train.distributed import Dist
from dtl_fast.train.graphs import LossSums, StaticBatch, StepRunner, check_lengths, pad_videos
from dtl_fast.train.loop import _build_models, graphs_decision
from test_train import TINY, make_dataset

FRAMES = 3  # TINY's --max-frames; make_dataset's clips have 1..3 frames
# the static length of the runners below: longer than every collated batch, so each batch is
# padded (in the real loop it is --max-frames, which only some batches fall short of)
PAD = 5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    # 14 training samples: with batches of 4, three full batches and a partial one of 2
    return make_dataset(tmp_path_factory.mktemp("graphs") / "set", counts=(14, 3, 3))


def _batches(root: Path, batch_size: int = 4) -> list:
    from dtl_fast.data import collate_multimodal
    from dtl_fast.train.datasets import open_datasets

    cfg = TrainConfig(data=str(root), **TINY)
    ds = open_datasets(root, cfg, Dist(), splits=("train",))["train"]
    return list(DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_multimodal))


def _models(device="cpu", capturable=False):
    seed_everything(0)
    models = _build_models(TrainConfig(**TINY), 3, "auto" if device == "cpu" else "fused")
    for m in models.values():
        m.to(device)
    optims = {n: torch.optim.Adam(m.parameters(), lr=5e-3, capturable=capturable)
              for n, m in models.items()}
    return models, optims


def _params(models: dict) -> dict:
    return {f"{n}.{k}": v.detach().clone() for n, m in models.items() for k, v in m.state_dict().items()}


def test_batches_have_short_clips_and_a_partial_batch(root):
    batches = _batches(root)
    assert [int(b.labels.numel()) for b in batches] == [4, 4, 4, 2]
    # some batches' longest clip is shorter than --max-frames: the padding is exercised
    assert min(int(b.videos.shape[1]) for b in batches) < FRAMES


def test_static_buffer_step_is_bitwise_the_eager_loop(root):
    """Two epochs (8 steps, two of them partial batches) through StaticBatch + StepRunner(static)
    give bitwise the parameters and loss sums of the eager loop on the same padded batches."""
    batches = _batches(root)
    models_a, optims_a = _models()
    models_b, optims_b = _models()
    eager = StepRunner(models_a, optims_a, device=torch.device("cpu"), amp=None, batch_size=4,
                       frames=PAD)
    static = StepRunner(models_b, optims_b, device=torch.device("cpu"), amp=None, batch_size=4,
                        frames=PAD, static=True)
    assert not eager.static and static.static and not static.capture
    ptrs = None
    for _ in range(2):
        sums_a, sums_b = LossSums(("dtl", "image_cnn", "video_baseline"), torch.device("cpu")), \
            LossSums(("dtl", "image_cnn", "video_baseline"), torch.device("cpu"))
        for batch in batches:
            padded = batch._replace(videos=pad_videos(batch.videos, PAD))
            sums_a.add(eager.step(padded), int(batch.labels.numel()))
            sums_b.add(static.step(batch), int(batch.labels.numel()))
            b = static.buffers
            now = (b.images.data_ptr(), b.videos.data_ptr(), b.lengths.data_ptr(), b.labels.data_ptr())
            assert ptrs is None or now == ptrs, "the static buffers must keep their storage"
            ptrs = now
        assert torch.equal(sums_a.tensor(), sums_b.tensor())
        assert sums_a.read()[1] == 14
    assert static.full_steps == 6
    pa, pb = _params(models_a), _params(models_b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    # and the steps changed the weights (a runner that did nothing would pass the above)
    fresh = _params(_models()[0])
    assert sum(not torch.equal(fresh[k], pa[k]) for k in pa) > len(pa) // 2


def test_padding_to_max_frames_changes_shapes_not_the_function(root):
    """The eager loop on the collated batches (clips as long as each batch's longest) and the
    static runner (clips padded to --max-frames) train the same models: the outputs agree to
    float32 rounding (padded frames are masked out everywhere)."""
    batches = _batches(root)
    models_a, optims_a = _models()
    models_b, optims_b = _models()
    eager = StepRunner(models_a, optims_a, device=torch.device("cpu"), amp=None, batch_size=4,
                       frames=PAD)
    static = StepRunner(models_b, optims_b, device=torch.device("cpu"), amp=None, batch_size=4,
                        frames=PAD, static=True)
    for batch in batches[:1]:
        la, lb = eager.step(batch), static.step(batch)
        for name in la:
            torch.testing.assert_close(la[name], lb[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in models_a:  # after one Adam step (lr 5e-3) the weights agree closely
        for (k, va), vb in zip(models_a[name].state_dict().items(), models_b[name].state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")


def _batch(B: int, T: int, seed: int):
    from dtl_fast.data import MultiModalBatch

    g = torch.Generator().manual_seed(seed)
    return MultiModalBatch(torch.randn(B, 3, 6, 6, generator=g), torch.randn(B, T, 3, 5, 5, generator=g),
                           torch.randint(1, T + 1, (B,), generator=g), torch.randint(0, 3, (B,), generator=g))


def test_static_batch_fill_checks_and_zeroes():
    buf = StaticBatch(4, PAD, torch.device("cpu"))
    long, short = _batch(4, PAD, 0), _batch(4, 2, 1)
    buf.fill(long)
    assert torch.equal(buf.videos, long.videos) and torch.equal(buf.images, long.images)
    buf.fill(short)
    assert torch.equal(buf.videos[:, :2], short.videos) and torch.equal(buf.images, short.images)
    assert not buf.videos[:, 2:].any(), "frames of the previous batch left in the buffer"
    assert torch.equal(buf.lengths, short.lengths) and torch.equal(buf.labels, short.labels)
    with pytest.raises(ValueError, match="batch of 2 samples, the buffers hold 4"):
        buf.fill(_batch(2, 2, 3))
    bad = short._replace(lengths=short.lengths.clone(), labels=short.labels + 1)
    bad.lengths[0] = 3  # longer than its clips (2 frames): checked on the host before any copy
    before = buf.labels.clone()
    with pytest.raises(ValueError, match=r"clip lengths in \[.*\], outside \[1, 2\]"):
        buf.fill(bad)
    assert torch.equal(buf.labels, before), "a rejected batch must not be copied in"
    with pytest.raises(ValueError, match="outside"):
        check_lengths(torch.zeros(4, dtype=torch.int64), PAD)
    with pytest.raises(ValueError, match="more than --max-frames"):
        pad_videos(torch.zeros(2, PAD + 1, 3, 4, 4), PAD)
    with pytest.raises(ValueError, match="more than --max-frames"):
        buf.fill(_batch(4, PAD + 1, 4))
    with pytest.raises(ValueError, match="differ from the buffers"):
        buf.fill(_batch(4, 2, 5)._replace(images=torch.zeros(4, 3, 7, 7)))


def test_steps_read_no_loss_on_the_host(root, monkeypatch):
    """The loop's hot path (step, on-device sums, a progress bar that is off) never turns a loss
    into a Python number: on a GPU that would wait for the GPU at every step. (Adam and the
    models read CPU scalars of their own, which cost no sync; only the losses are tracked.)"""
    from dtl_fast.train.progress import EpochProgress

    batches = _batches(root)
    models, optims = _models()
    runner = StepRunner(models, optims, device=torch.device("cpu"), amp=None, batch_size=4,
                        frames=PAD, static=True)
    sums = LossSums(("dtl", "image_cnn", "video_baseline"), torch.device("cpu"))
    bar = EpochProgress(14, "epoch 1/1", enabled=False)
    read_ptrs = []
    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__

    def item(self):
        read_ptrs.append(self.data_ptr())
        return real_item(self)

    def to_float(self):
        read_ptrs.append(self.data_ptr())
        return real_float(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "__float__", to_float)
    kept = []  # every loss returned, kept alive so that no other tensor reuses its memory
    for batch in batches:
        losses = runner.step(batch)
        sums.add(losses, int(batch.labels.numel()))
        bar.update(int(batch.labels.numel()), loss=losses["dtl"])
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in losses.values())
        kept.extend(losses.values())
    monkeypatch.undo()
    assert read_ptrs, "the patch saw no reads at all (Adam reads its CPU step counts)"
    loss_ptrs = {t.data_ptr() for t in kept}
    assert not loss_ptrs & set(read_ptrs), "a loss was read on the host during the steps"
    mean, count = sums.read()
    assert count == 14 and set(mean) == {"dtl", "image_cnn", "video_baseline"}
    # a bar that draws reads the latest loss, but only at its redraw interval and at the end
    shown = EpochProgress(14, "e", stream=io.StringIO(), log_interval=3600.0)
    calls = []
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: calls.append(1) or real_float(self))
    for i in range(7):
        shown.update(2, loss=kept[i % len(kept)])
    monkeypatch.undo()
    assert len(calls) == 2, calls  # the first update and the last (the epoch's end)


def test_graphs_decision_and_its_record(root, tmp_path, capsys):
    cfg = TrainConfig(data=str(root), **TINY)
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it here
    assert graphs_decision(cfg, cuda, "fused", Dist())[0] is True
    use, why = graphs_decision(cfg, torch.device("cpu"), "auto", Dist())
    assert not use and "graphs need CUDA" in why
    assert graphs_decision(cfg, cuda, "reference", Dist()) == (
        False, "the modules run backend 'reference' (graphs are used with the fused kernels, "
               "the path kept free of host syncs)")
    assert "DDP" in graphs_decision(cfg, cuda, "fused", Dist(world=2))[1]
    off = TrainConfig(data=str(root), **dict(TINY, cuda_graphs=False))
    assert graphs_decision(off, cuda, "fused", Dist()) == (False, "--no-cuda-graphs")
    comp = TrainConfig(data=str(root), **dict(TINY, compile=True))
    assert "--compile" in graphs_decision(comp, cuda, "fused", Dist())[1]
    on = TrainConfig(data=str(root), **dict(TINY, cuda_graphs=True))
    with pytest.raises(ValueError, match="--cuda-graphs cannot be used here: the device is cpu"):
        graphs_decision(on, torch.device("cpu"), "auto", Dist())
    # a CPU run says it ran without graphs and why, and records it
    metrics = train(TrainConfig(data=str(root), out=str(tmp_path), epochs=1, **dict(TINY, baselines=False)))
    assert metrics["cuda_graphs"] == {"requested": None, "used": False, "replays": 0,
                                      "reason": "the device is cpu: graphs need CUDA"}
    assert metrics["compile"] is False
    assert json.loads((tmp_path / "metrics.json").read_text())["cuda_graphs"]["used"] is False
    assert "cuda graphs: off (the device is cpu: graphs need CUDA)" in capsys.readouterr().out
    # --cuda-graphs on the CPU is an error naming the flag, before anything trains
    from dtl_fast import cli

    assert cli.main(["train", "--data", str(root), "--out", str(tmp_path / "x"), "--cuda-graphs",
                     "--device", "cpu"]) == 2
    assert "--cuda-graphs cannot be used here" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_compile_wiring_on_cpu(root, tmp_path, monkeypatch):
    """--compile wraps each trained model in torch.compile (checked here with the aot_eager
    backend, which traces through dynamo and AOT autograd without inductor's slow CPU codegen):
    the checkpoint and best.pt hold plain state_dicts, metrics say compile, and the weights
    match an eager run (aot_eager runs the same ATen ops)."""
    real_compile, wrapped = torch.compile, []

    def compile_aot_eager(model, **kwargs):
        wrapped.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kwargs)

    base = dict(TINY, baselines=False)
    train(TrainConfig(data=str(root), out=str(tmp_path / "e"), epochs=1, **base))
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    comp = train(TrainConfig(data=str(root), out=str(tmp_path / "c"), epochs=1, **dict(base, compile=True)))
    assert wrapped == ["DTL"] and comp["compile"] is True
    for name in ("checkpoint.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "e" / name)["models"]["dtl"]["state_dict"]
        b = load_checkpoint(tmp_path / "c" / name)["models"]["dtl"]["state_dict"]
        assert a.keys() == b.keys() and not any(k.startswith("_orig_mod") for k in b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


# ------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.gpu
def test_captured_steps_match_eager_steps_on_cuda(root):
    """StepRunner(capture=True): 3 warm-up steps, a capture, replays and the eager partial
    batch, against the same static runner without capture (same Adam(capturable=True), same
    padded buffers): bitwise where the kernels are deterministic, else to kernel rounding."""
    batches = _batches(root, batch_size=2)  # 7 full batches an epoch
    dev = torch.device("cuda")
    models_a, optims_a = _models("cuda", capturable=True)
    models_b, optims_b = _models("cuda", capturable=True)
    for m in (*models_a.values(), *models_b.values()):
        if hasattr(m, "static_shapes"):
            m.static_shapes = True  # as train() sets it with graphs on
    plain = StepRunner(models_a, optims_a, device=dev, amp=None, batch_size=2, frames=FRAMES,
                       static=True, device_lengths=True)
    graphed = StepRunner(models_b, optims_b, device=dev, amp=None, batch_size=2, frames=FRAMES, capture=True)
    for _ in range(2):
        for batch in batches:
            batch = batch.to(dev)._replace(lengths=batch.lengths)
            la, lb = plain.step(batch), graphed.step(batch)
            for n in la:
                torch.testing.assert_close(lb[n], la[n], rtol=1e-4, atol=1e-5)
    assert graphed.graphs and graphed.replays == 2 * 7 - 3 and graphed.capture_error is None
    pa, pb = _params(models_a), _params(models_b)
    exact = sum(torch.equal(pa[k], pb[k]) for k in pa)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5, msg=k)
    print(f"{exact} of {len(pa)} tensors bitwise equal after 14 steps")


@pytest.mark.gpu
def test_train_with_graphs_resumes_on_cuda(root, tmp_path):
    base = dict(TINY, batch_size=2, backend="fused", device="cuda", data=str(root), cuda_graphs=True)
    full = train(TrainConfig(**dict(base, epochs=2, out=str(tmp_path / "full"))))
    assert full["cuda_graphs"]["used"] is True and full["cuda_graphs"]["replays"] > 0
    train(TrainConfig(**dict(base, epochs=1, out=str(tmp_path / "r"))))
    res = train(TrainConfig(**dict(base, epochs=2, out=str(tmp_path / "r"), resume=True)))
    assert res["cuda_graphs"]["used"] is True
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    for name in a["models"]:
        sa, sb = a["models"][name]["state_dict"], b["models"][name]["state_dict"]
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
    # graphs off from the checkpoint of a graphed run: Adam's step counts move back to the CPU
    off = train(TrainConfig(**dict(base, cuda_graphs=False, epochs=3, out=str(tmp_path / "r"), resume=True)))
    assert off["cuda_graphs"]["used"] is False and off["cuda_graphs"]["reason"] == "--no-cuda-graphs"
