"""dtl_fast.models: DTL with the fused backend (Triton interpreter on CPU, tiny sizes) against
the reference backend on the same weights (all three logits, every parameter gradient of
dtl_loss, the input gradients), padding invariance (the encoder never sees a padded frame),
backend propagation, .config round trips, dtl_loss, the baselines, the encoders and their
local weights, and bad arguments / inputs."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dtl_fast.models import (DTL, ConvEncoder, DTLOutput, ImageBaseline, VideoBaseline, dtl_loss)
from dtl_fast.nn import GRU

from _helpers import assert_rel_close, rel_err

TOL = 1e-4  # float32 fused vs reference (task's bound); a real bug gives O(1e-1)

TINY = dict(width=8, hidden_size=8, dim=16, num_heads=2, num_layers=1, window=1, num_memory=2)
NUM_CLASSES = 5


def _batch(B=3, lengths=(3, 1, 2), size=8, frame_size=None, T=None, dtype=torch.float32,
           device="cpu", seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) if T is None else T
    fs = size if frame_size is None else frame_size
    images = torch.randn(B, channels, size, size, generator=g, dtype=torch.float64)
    videos = torch.randn(B, T, channels, fs, fs, generator=g, dtype=torch.float64)
    L = torch.tensor(lengths, dtype=torch.int64)
    videos[torch.arange(T)[None, :] >= L[:, None]] = 0.0
    labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
    return (images.to(device, dtype), videos.to(device, dtype), L, labels.to(device))


def _pad_with(videos, lengths, value):
    """A copy of videos whose padded frames are `value` (NaN, a big number)."""
    v = videos.clone()
    pad = torch.arange(v.shape[1])[None, :] >= lengths.cpu()[:, None]
    v[pad.to(v.device)] = value
    return v


def _step(model, images, videos, lengths, labels):
    """forward + dtl_loss + backward on fresh leaf inputs; returns (logits, loss, input grads,
    {name: parameter grad})."""
    images = images.detach().clone().requires_grad_()
    videos = videos.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(images, videos, lengths)
    loss = dtl_loss(out, labels)
    loss.backward()
    return (tuple(o.detach() for o in out), loss.detach(), (images.grad, videos.grad),
            {n: p.grad for n, p in model.named_parameters()})


def _fused_modules(model):
    """Every dtl_fast.nn module inside that takes a backend (helpers such as the composition
    attention, which runs no op, have none)."""
    return [m for m in model.modules()
            if type(m).__module__.startswith("dtl_fast.nn") and hasattr(m, "backend")]


# --------------------------------------------------------------------------------------------
# fused vs reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rnn,B,lengths,extra", [
    ("lstm", 3, (3, 1, 2), {}),
    # GRU: the attention stack is the same; without its optional branches to keep the
    # interpreter time down
    ("gru", 2, (1, 3), dict(window=None, num_memory=0)),
], ids=["lstm", "gru"])
def test_fused_matches_reference(rnn, B, lengths, extra, poison):
    torch.manual_seed(1)
    ref = DTL(NUM_CLASSES, rnn=rnn, **dict(TINY, **extra), backend="reference")
    fused = copy.deepcopy(ref).set_backend("fused")
    images, videos, L, y = _batch(B, lengths)
    want = _step(ref, images, videos, L, y)
    # the fused model gets NaN in its padded frames: padding invariance of the fused path too
    with poison():
        got = _step(fused, images, _pad_with(videos, L, float("nan")), L, y)
    for name, o, r in zip(DTLOutput._fields, got[0], want[0]):
        assert o.shape == (B, NUM_CLASSES)
        assert_rel_close(f"{rnn} logits.{name}", o, r, TOL)
    assert_rel_close(f"{rnn} loss", got[1], want[1], TOL)
    assert_rel_close(f"{rnn} images.grad", got[2][0], want[2][0], TOL)
    assert_rel_close(f"{rnn} videos.grad", torch.nan_to_num(got[2][1], nan=1e30), want[2][1], TOL)
    pad = (torch.arange(videos.shape[1])[None, :] >= L[:, None])
    assert torch.equal(got[2][1][pad], torch.zeros_like(got[2][1][pad])), "padded frames got gradient"
    assert_param_grads_close(rnn, got[3], want[3], TOL, floor=1e-6)


def assert_param_grads_close(label, got, want, tol, floor):
    """Every parameter gradient within tol of the reference's, relative to its own norm, or to
    floor x the norm of all gradients together where it is smaller than that (a gradient that
    is (near) zero in the function has no meaningful relative error)."""
    scale = math.sqrt(sum(float(g.double().norm()) ** 2 for g in want.values()))
    assert scale > 0 and set(got) == set(want)
    for name, r in want.items():
        g = got[name]
        assert r is not None and g is not None, f"{label} {name}: no gradient"
        assert g.shape == r.shape and bool(torch.isfinite(g).all()), f"{label} {name}.grad"
        denom = max(float(r.double().norm()), floor * scale)
        err = float((g.double().cpu() - r.double().cpu()).norm()) / denom
        assert err <= tol, (f"{label} {name}.grad: error {err:.2e} > {tol:.0e} (norm "
                            f"{float(r.norm()):.3e}, all grads {scale:.3e})")


# --------------------------------------------------------------------------------------------
# padding, encoder calls
# --------------------------------------------------------------------------------------------
def _count_encoder_inputs(model):
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


@pytest.mark.parametrize("frame_size", [8, 12], ids=["same-size", "other-size"])
def test_padding_invariance_and_valid_frames_only(frame_size):
    model = DTL(NUM_CLASSES, **TINY, backend="auto").eval()
    images, videos, L, _ = _batch(3, (3, 1, 2), frame_size=frame_size, T=4)
    seen, handle = _count_encoder_inputs(model)
    with torch.no_grad():
        base = model(images, videos, L)
        for value in (float("nan"), 1e6, float("inf")):
            other = model(images, _pad_with(videos, L, value), L)
            for name, a, b in zip(DTLOutput._fields, other, base):
                assert torch.isfinite(a).all(), (value, name)
                assert torch.equal(a, b), f"{name} changed when padded frames became {value}"
    handle.remove()
    n_valid = int(L.sum())
    # same size: one encoder call on images + valid frames; other size: frames, then images
    per_call = [n_valid + 3] if frame_size == 8 else [n_valid, 3]
    assert seen == per_call * 4, seen
    # a changed valid frame does change the video and fused views (the test can fail)
    v2 = videos.clone()
    v2[1, 0] += 1.0
    with torch.no_grad():
        changed = model(images, v2, L)
    assert not torch.equal(changed.video, base.video) and not torch.equal(changed.fused, base.fused)
    assert torch.equal(changed.image[0], base.image[0])  # other samples' image views are theirs


def test_lengths_forms_and_devices_agree():
    model = DTL(NUM_CLASSES, **TINY, backend="reference").eval()
    images, videos, L, _ = _batch()
    with torch.no_grad():
        a = model(images, videos, L)
        b = model(images, videos, [3, 1, 2])
        c = model(images, videos, L.to(torch.int32))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------
def test_backend_reaches_every_fused_module(monkeypatch):
    model = DTL(NUM_CLASSES, **TINY)
    mods = _fused_modules(model)
    kinds = {type(m).__name__ for m in mods}
    assert {"LSTM", "FeatureExchange", "DualModalAttention", "DAMLayer", "CosineAttention",
            "_MemoryReadout", "FramePool"} <= kinds, kinds
    assert model.backend is None and all(m.backend is None for m in mods)
    for value in ("fused", "reference", "auto", None):
        model.backend = value
        assert model.backend == value and model.config["backend"] == value
        assert all(m.backend == value for m in mods), [(type(m).__name__, m.backend) for m in mods]
    assert model.set_backend("reference") is model
    with pytest.raises(ValueError, match="backend"):
        model.backend = "cuda"
    assert all(m.backend == "reference" for m in mods)  # a bad value changes nothing
    built = DTL(NUM_CLASSES, **TINY, rnn="gru", backend="fused")
    assert all(m.backend == "fused" for m in _fused_modules(built))
    assert any(isinstance(m, GRU) for m in built.modules())
    vb = VideoBaseline(NUM_CLASSES, width=8, backend="reference")
    assert vb.pool.backend == "reference"
    vb.backend = "auto"
    assert vb.pool.backend == "auto" and vb.config["backend"] == "auto"
    # backend None: every module reads $DTL_FAST_BACKEND when it runs
    model.backend = None
    images, videos, L, _ = _batch()
    monkeypatch.setenv("DTL_FAST_BACKEND", "not-a-backend")
    with pytest.raises(ValueError, match="DTL_FAST_BACKEND"):
        model(images, videos, L)
    monkeypatch.setenv("DTL_FAST_BACKEND", "reference")
    with torch.no_grad():
        out = model(images, videos, L)
    assert torch.isfinite(out.fused).all()


# --------------------------------------------------------------------------------------------
# config, loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (DTL, dict(TINY, rnn="gru", dropout=0.1, backend="reference")),
    (DTL, dict(TINY, window=None, num_memory=0)),
    (ImageBaseline, dict(width=8)),
    (VideoBaseline, dict(width=8, backend="auto")),
], ids=["dtl-gru", "dtl-no-branches", "image", "video"])
def test_config_rebuilds_the_model(cls, kwargs):
    model = cls(NUM_CLASSES, **kwargs)
    cfg = json.loads(json.dumps(model.config))
    assert cfg["num_classes"] == NUM_CLASSES
    for k, v in kwargs.items():
        assert cfg[k] == v, k
    again = cls(**cfg)
    assert again.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    again.load_state_dict(model.state_dict(), strict=True)
    model.eval(), again.eval()
    images, videos, L, _ = _batch()
    with torch.no_grad():
        if cls is DTL:
            a, b = model(images, videos, L), again(images, videos, L)
        elif cls is ImageBaseline:
            a, b = (model(images),), (again(images),)
        else:
            a, b = (model(videos, L),), (again(videos, L),)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_dtl_loss_is_the_sum_of_three_cross_entropies():
    g = torch.Generator().manual_seed(3)
    out = DTLOutput(*(torch.randn(4, NUM_CLASSES, generator=g) for _ in range(3)))
    y = torch.tensor([0, 4, 2, 2])
    ce = [F.cross_entropy(o, y) for o in out]
    torch.testing.assert_close(dtl_loss(out, y), ce[0] + ce[1] + ce[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(dtl_loss(out, y, weights=(0.5, 0.0, 2.0)), 0.5 * ce[0] + 2.0 * ce[2],
                               rtol=1e-6, atol=0)
    assert dtl_loss(out, y).item() != pytest.approx(ce[2].item())  # the three terms, not one
    with pytest.raises(ValueError, match="labels"):
        dtl_loss(out, y.float())
    with pytest.raises(ValueError, match="labels"):
        dtl_loss(out, y[:3])
    with pytest.raises(ValueError, match="weights"):
        dtl_loss(out, y, weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        dtl_loss(out, y, weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="output"):
        dtl_loss(out[:2], y)
    with pytest.raises(ValueError, match="output.fused"):
        dtl_loss(DTLOutput(out.image, out.video, out.fused[:, :3]), y)


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
def test_baselines_forward_backward_and_padding():
    torch.manual_seed(2)
    images, videos, L, y = _batch(3, (3, 1, 2), T=4)
    ib, vb = ImageBaseline(NUM_CLASSES, width=8), VideoBaseline(NUM_CLASSES, width=8)
    dtl = DTL(NUM_CLASSES, **TINY)
    n_enc = sum(p.numel() for p in dtl.encoder.parameters())
    for m in (ib, vb):
        assert sum(p.numel() for p in m.encoder.parameters()) == n_enc  # the same encoder
    # heads: the image readout is a linear map of the 4 x 4 x width grid to the classes; the
    # video one reads each frame out to width features, then a linear map to the classes
    assert sum(p.numel() for p in ib.parameters()) == n_enc + (16 * 8 + 1) * NUM_CLASSES
    assert sum(p.numel() for p in vb.parameters()) == n_enc + (16 * 8 + 1) * 8 + (8 + 1) * NUM_CLASSES
    li = ib(images)
    lv = vb(videos, L)
    assert li.shape == lv.shape == (3, NUM_CLASSES)
    (F.cross_entropy(li, y) + F.cross_entropy(lv, y)).backward()
    for m in (ib, vb):
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    seen, handle = _count_encoder_inputs(vb)
    with torch.no_grad():
        a = vb(videos, L)
        b = vb(_pad_with(videos, L, float("nan")), L)
        c = vb(_pad_with(videos, L, 1e6), L)
    handle.remove()
    assert seen == [int(L.sum())] * 3
    assert torch.equal(a, b) and torch.equal(a, c)
    # the pool is a masked mean over the valid frames: recompute it by hand
    with torch.no_grad():
        feats = [vb.readout(vb.encoder(videos[i, :n])).mean(0) for i, n in enumerate(L.tolist())]
        manual = vb.head(torch.stack(feats))
    torch.testing.assert_close(a, manual, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        vb(videos, [0, 1, 2])
    with pytest.raises(ValueError, match="images"):
        ib(videos)


# --------------------------------------------------------------------------------------------
# encoders, local weights, resnet18
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (8, 8), (13, 6), (1, 3)])
def test_conv_encoder_shapes_and_tokens(hw):
    e = ConvEncoder(3, 8)
    x = torch.randn(2, 3, *hw)
    fmap = e(x)
    h1, w1 = (math.ceil(math.ceil(s / 2) / 2) for s in hw)
    assert fmap.shape == (2, 8, h1, w1)
    tok = e.tokens(x)
    assert tok.shape == (2, h1 * w1, 8)
    assert torch.equal(tok[:, 1 if w1 > 1 else 0], fmap[:, :, 0, 1 if w1 > 1 else 0])  # row-major
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in e.modules())
    # each sample normalised on its own: a sample's output does not depend on the batch
    torch.testing.assert_close(e(x[:1]), fmap[:1], rtol=1e-5, atol=1e-6)


def test_cnn_encoder_weights_from_a_local_file(tmp_path):
    src = ConvEncoder(3, 8)
    path = tmp_path / "enc.pt"
    torch.save(src.state_dict(), path)
    for cls, kw in ((DTL, TINY), (ImageBaseline, dict(width=8)), (VideoBaseline, dict(width=8))):
        m = cls(NUM_CLASSES, **kw, encoder_weights=path)
        for k, v in src.state_dict().items():
            assert torch.equal(m.encoder.state_dict()[k], v), (cls.__name__, k)
        assert m.config["encoder_weights"] == str(path)
    # a DistributedDataParallel save ("module." prefix) loads too
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    m = DTL(NUM_CLASSES, **TINY, encoder_weights=str(tmp_path / "ddp.pt"))
    assert torch.equal(m.encoder.blocks[0][0].weight, src.blocks[0][0].weight)

    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        DTL(NUM_CLASSES, **TINY, encoder_weights=missing)
    wrong = dict(src.state_dict())
    wrong["extra.weight"] = torch.zeros(1)
    del wrong["blocks.0.0.weight"]
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing keys \(1\): blocks\.0\.0\.weight.*"
                                         r"unexpected keys \(1\): extra\.weight"):
        DTL(NUM_CLASSES, **TINY, encoder_weights=tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="shape mismatches"):
        DTL(NUM_CLASSES, **dict(TINY, width=16), encoder_weights=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        ImageBaseline(NUM_CLASSES, width=8, encoder_weights=tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state_dict"):
        ImageBaseline(NUM_CLASSES, width=8, encoder_weights=tmp_path / "list.pt")
    with pytest.raises(ValueError, match="encoder_weights"):
        DTL(NUM_CLASSES, **TINY, encoder_weights=123)
    # a ResNet's state_dict for the ConvEncoder: the error says which encoder it needs
    resnetish = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer4.1.bn2.weight": torch.zeros(512)}
    torch.save(resnetish, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"r18\.pt' does not match the ConvEncoder \(the file holds "
                                         r"a ResNet's weights: they need encoder=\"resnet18\""):
        DTL(NUM_CLASSES, **TINY, encoder_weights=tmp_path / "r18.pt")


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def test_resnet18_encoder(tmp_path):
    if not _has_torchvision():
        # torchvision is optional: asking for it without it is one clear error, from each model
        for build in (lambda: DTL(NUM_CLASSES, encoder="resnet18"),
                      lambda: ImageBaseline(NUM_CLASSES, encoder="resnet18"),
                      lambda: VideoBaseline(NUM_CLASSES, encoder="resnet18")):
            with pytest.raises(RuntimeError, match="pip install torchvision"):
                build()
        return
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(tv.state_dict(), path)  # with the fc.* keys
    model = DTL(NUM_CLASSES, encoder="resnet18", encoder_weights=path, hidden_size=8, dim=16,
                num_heads=2, num_layers=1, backend="reference").eval()
    assert model.encoder.out_channels == 512
    assert torch.equal(model.encoder.conv1.weight, tv.conv1.weight)
    images, videos, L, _ = _batch(2, (2, 1), size=32)
    with torch.no_grad():
        out = model(images, videos, L)
        trunk = torch.nn.Sequential(*list(tv.children())[:-2]).eval()
        torch.testing.assert_close(model.encoder(images), trunk(images))
    assert all(o.shape == (2, NUM_CLASSES) for o in out)
    # the torchvision file had one set of BatchNorm statistics: the images' start as a copy
    enc = model.encoder
    assert enc.image_stat_keys and all(
        torch.equal(getattr(enc, twin), tv.state_dict()[path]) for path, twin in enc._image_stats.items())
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_images(images), trunk(images))
    bad = {k: v for k, v in tv.state_dict().items() if not k.startswith("layer4")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys"):
        ImageBaseline(NUM_CLASSES, encoder="resnet18", encoder_weights=tmp_path / "bad.pt")


def test_resnet18_keeps_each_modality_s_batchnorm_statistics(tmp_path):
    # DTL encodes frames and images in two calls of one shared BatchNorm encoder. Each modality
    # keeps its own running statistics, so eval() normalises each as its own training batches
    # were: after the same training-mode calls, the shared encoder in eval() equals an encoder
    # that only ever saw frames on the frames and one that only saw images on the images (with
    # one set of statistics both would hold a blend: frames of mean -3, images of mean +3).
    if not _has_torchvision():
        pytest.skip("torchvision is not installed")
    import copy

    from dtl_fast.models.encoders import ResNet18Encoder, _encode_with_images

    torch.manual_seed(0)
    shared = ResNet18Encoder(3)
    frames_only, images_only = copy.deepcopy(shared), copy.deepcopy(shared)
    frames = torch.randn(6, 3, 32, 32) - 3
    images = torch.randn(4, 3, 32, 32) + 3
    for _ in range(3):
        _encode_with_images(shared, frames, images)
        frames_only(frames)
        images_only(images)
    for m in (shared, frames_only, images_only):
        m.eval()
    with torch.no_grad():
        f_map, i_map = _encode_with_images(shared, frames, images)
        torch.testing.assert_close(f_map, frames_only(frames), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(i_map, images_only(images), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(shared(images), images_only(images), rtol=1e-2, atol=1e-2)
    # both sets are saved, and a state_dict without the images' set (saved before it existed)
    # loads with it copied from the frames'
    state = shared.state_dict()
    assert set(shared.image_stat_keys) <= set(state)
    fresh = ResNet18Encoder(3)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    old = {k: v for k, v in state.items() if k not in shared.image_stat_keys}
    fresh.load_state_dict(old)
    assert torch.equal(fresh.images_bn1_running_mean, state["bn1.running_mean"])
    # ... as a copy, also when the tensors are assigned rather than copied in
    assigned = ResNet18Encoder(3)
    assigned.load_state_dict(old, assign=True)
    assert assigned.images_bn1_running_mean is not assigned.bn1.running_mean
    assert torch.equal(assigned.images_bn1_running_mean, state["bn1.running_mean"])
    # an encoder's own state_dict (both sets) is a valid encoder_weights file
    from dtl_fast.models.encoders import load_encoder_weights
    path = tmp_path / "own.pt"
    torch.save(state, path)
    load_encoder_weights(fresh, path, owner="test")
    assert torch.equal(fresh.images_bn1_running_mean, state["images_bn1_running_mean"])
    # under DistributedDataParallel the BatchNorm layers become SyncBatchNorm (new modules):
    # the images' statistics still reach them
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(shared)).eval()
    assert isinstance(synced.bn1, torch.nn.SyncBatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(synced.forward_images(images), i_map)
        torch.testing.assert_close(synced(frames), f_map)


def test_resnet18_forward_images_from_two_threads():
    # Two threads in forward_images on one encoder (a threaded inference server): each must run
    # on the images' statistics and leave the frames' in place. A pre-forward hook holds each
    # thread inside its call until the other arrives (or 1 s passes): without the lock both
    # would swap, the second recording the first's twins as "own" and restoring them for good.
    if not _has_torchvision():
        pytest.skip("torchvision is not installed")
    import threading
    import time

    from dtl_fast.models.encoders import ResNet18Encoder

    torch.manual_seed(0)
    enc = ResNet18Encoder(3)
    for _ in range(2):
        enc.forward_images(torch.randn(4, 3, 32, 32) + 3)
        enc(torch.randn(4, 3, 32, 32) - 3)
    enc.eval()
    own = enc.bn1.running_mean
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = enc.forward_images(images)
    barrier, arrived = threading.Barrier(2), []

    def meet(module, args):
        arrived.append(threading.get_ident())
        second = len(arrived) == 2
        try:
            barrier.wait(timeout=1.0)
        except threading.BrokenBarrierError:
            pass
        if second:  # the later swapper restores last: its "own" would be the first's twins
            time.sleep(0.3)

    hook = enc.conv1.register_forward_pre_hook(meet)
    got = [None, None]

    def run(i):
        with torch.no_grad():
            got[i] = enc.forward_images(images)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    assert enc.bn1.running_mean is own and enc.bn1.running_mean is not enc.images_bn1_running_mean
    for g in got:
        torch.testing.assert_close(g, want)


# --------------------------------------------------------------------------------------------
# bad arguments and inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=2.0), "num_classes"),
    (dict(rnn="lstmm"), "rnn"),
    (dict(encoder="vgg"), "encoder"),
    (dict(width=0), "width"),
    (dict(in_channels=0), "in_channels"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(dim=0), "dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(dim=17), "divisible by num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(window=-1), "window"),
    (dict(num_memory=-1), "num_memory"),
    (dict(dropout=1.0), "dropout"),
    (dict(backend="gpu"), "backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(kwargs, name):
    kw = dict(TINY, num_classes=NUM_CLASSES)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        DTL(**kw)


@pytest.mark.parametrize("cls", [ImageBaseline, VideoBaseline])
def test_baseline_bad_arguments(cls):
    with pytest.raises(ValueError, match="num_classes"):
        cls(1)
    with pytest.raises(ValueError, match="encoder"):
        cls(NUM_CLASSES, encoder="resnet50")
    with pytest.raises(ValueError, match="width"):
        cls(NUM_CLASSES, width=0)


def test_bad_inputs():
    model = DTL(NUM_CLASSES, **TINY, backend="reference")
    images, videos, L, _ = _batch()
    cases = [
        ((images[0], videos, L), "images must be a 4-D"),
        ((images, videos[0], L), "videos must be a 5-D"),
        ((images[:, :1], videos, L), "images must have C = in_channels = 3"),
        ((images, videos[:, :, :2], L), "videos must have C = in_channels = 3"),
        ((images[:2], videos, L), "same batch size"),
        ((images.long(), videos, L), "images must be float"),
        ((images.double(), videos, L), "same dtype"),
        ((images, videos, None), "lengths is required"),
        ((images, videos, L.float()), "lengths must be an integer tensor"),
        ((images, videos, L[:2]), r"lengths must have shape \[B\]"),
        ((images, videos, torch.tensor([3, 0, 2])), r"lengths\[b\] must lie in \[1, T\]"),
        ((images, videos, torch.tensor([4, 1, 2])), r"lengths\[b\] must lie in \[1, T\]"),
        ((images, videos, [3, 1.5, 2]), "lengths must hold integers"),
        (("images", videos, L), "images must be a torch.Tensor"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(*args)


def test_inputs_checked_against_the_parameters():
    """An input dtype other than the parameters' (outside autocast) is a ValueError naming the
    input, for DTL and both baselines (before: conv2d's "expected scalar type Double but found
    Float"); the DTL's check cache does not let a model converted afterwards skip it; under
    CPU autocast another float dtype is what AMP runs."""
    model = DTL(NUM_CLASSES, **TINY, backend="reference")
    images, videos, L, _ = _batch()
    model(images, videos, L)  # cached for float32 inputs of a float32 model
    with pytest.raises(ValueError, match=r"DTL: images must have the module's dtype \(torch.float32\)"):
        model(images.double(), videos.double(), L)
    model.double()
    with pytest.raises(ValueError, match=r"DTL: images must have the module's dtype \(torch.float64\)"):
        model(images, videos, L)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images.bfloat16(), videos.bfloat16(), L)
    assert out.fused.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="ImageBaseline: images must have the module's dtype"):
        ImageBaseline(NUM_CLASSES, width=8)(images.double())
    with pytest.raises(ValueError, match="VideoBaseline: videos must have the module's dtype"):
        VideoBaseline(NUM_CLASSES, width=8)(videos.double(), L)
    with pytest.raises(ValueError, match="must be on the module's device"):
        model(images.to("meta"), videos.to("meta"), L)


def _like_a_data_parallel_replica(module):
    """What torch.nn.parallel.replicate makes of `module` for one device (here on the CPU): each
    submodule's shallow replica, with its parameters set as plain attributes (not Parameters:
    replicas' weights are not leaves), so a replica's parameters() is empty."""
    modules = list(module.modules())
    copies = {m: m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = copies[m]
        for name, child in m._modules.items():
            r._modules[name] = None if child is None else copies[child]
        for name, p in m._parameters.items():
            if p is None:
                r._parameters[name] = None
            else:
                setattr(r, name, p.detach().clone())
    return copies[module]


def test_models_run_as_data_parallel_replicas():
    """The input checks read a weight by attribute, as a replica has it (a first version took
    next(head.parameters()): StopIteration in every nn.DataParallel replica of ImageBaseline)."""
    images, videos, L, _ = _batch()
    for model, args in ((ImageBaseline(NUM_CLASSES, width=8), (images,)),
                        (VideoBaseline(NUM_CLASSES, width=8), (videos, L)),
                        (DTL(NUM_CLASSES, **TINY, backend="reference"), (images, videos, L))):
        model.eval()
        replica = _like_a_data_parallel_replica(model)
        assert not list(replica.parameters())
        want = model(*args)
        got = replica(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b)


def test_compiled_model_checks_images_against_videos():
    """Under torch.compile the images-vs-videos checks run too (before: only each tensor's own
    checks, and a batch mismatch surfaced as an attention op's error about k). With fullgraph
    the exception dynamo raises carries ours (without fullgraph dynamo falls back to the eager
    frame, whose checks always ran)."""
    model = DTL(NUM_CLASSES, **TINY, backend="reference")
    images, videos, L, _ = _batch()
    for fullgraph in (True, False):
        torch._dynamo.reset()  # (a failed trace is remembered: each form traces afresh)
        compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
        for args, msg in (((images[:2], videos, L), "DTL: images and videos must have the same batch size"),
                          ((images, videos.double(), L), "DTL: images and videos must have the same dtype")):
            with pytest.raises(Exception) as info:
                compiled(*args)
            assert msg in str(info.value), (fullgraph, str(info.value)[:400])


def test_numpy_integer_sizes():
    """NumPy integers pass check_int, so every submodule must get them as ints (before: the
    LSTM refused hidden_size=np.int64(8), 'hidden_size should be of type int')."""
    import numpy as np

    kw = {k: (np.int64(v) if isinstance(v, int) else v) for k, v in TINY.items()}
    model = DTL(np.int64(NUM_CLASSES), **kw, backend="reference")
    images, videos, L, _ = _batch()
    assert model(images, videos, L).fused.shape == (3, NUM_CLASSES)
    assert json.loads(json.dumps(model.config)) == model.config
    for cls, args in ((ImageBaseline, (images,)), (VideoBaseline, (videos, L))):
        assert cls(np.int64(NUM_CLASSES), width=np.int64(8), in_channels=np.int64(3))(*args).shape \
            == (3, NUM_CLASSES)


def test_lengths_type_error_does_not_offer_none():
    model = DTL(NUM_CLASSES, **TINY, backend="reference")
    images, videos, _, _ = _batch()
    with pytest.raises(ValueError, match=r"DTL: lengths must be a list of ints or an integer tensor"):
        model(images, videos, 3)


def test_whole_model_pickled_before_static_shapes_still_runs():
    """A DTL / VideoBaseline pickled whole (torch.save(model)) before static-shape mode and the
    input-check cache existed lacks both attributes; unpickling fills the defaults (before:
    "'DTL' object has no attribute '_checked_inputs'" at the first forward)."""
    images, videos, L, _ = _batch()
    for model, args in ((DTL(NUM_CLASSES, **TINY, backend="reference"), (images, videos, L)),
                        (VideoBaseline(NUM_CLASSES, width=8), (videos, L))):
        state = dict(model.__dict__)
        for name in ("static_shapes", "_checked_inputs"):
            state.pop(name, None)
        old = type(model).__new__(type(model))
        old.__setstate__(state)
        assert old.static_shapes is False
        torch.testing.assert_close(old(*args), model(*args))


def test_dtl_loss_bad_logits_and_labels():
    g = torch.Generator().manual_seed(3)
    out = DTLOutput(*(torch.randn(4, NUM_CLASSES, generator=g) for _ in range(3)))
    y = torch.tensor([0, 4, 2, 2])
    with pytest.raises(ValueError, match="output.image must be logits"):
        dtl_loss(([0.0] * 5, [0.0] * 5, [0.0] * 5), y)
    with pytest.raises(ValueError, match="output.image must be floating-point logits"):
        dtl_loss(tuple(o.long() for o in out), y)
    with pytest.raises(ValueError, match="output.video must have the dtype and device"):
        dtl_loss(DTLOutput(out.image, out.video.double(), out.fused), y)
    for bad, shown in (([0, 4, 5, 2], 5), ([0, -1, 2, 2], -1)):
        with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, num_classes\) "
                                             rf"= \[0, {NUM_CLASSES}\), got {shown}"):
            dtl_loss(out, torch.tensor(bad))
    with pytest.raises(ValueError, match="labels must be on the logits' device"):
        dtl_loss(out, y.to("meta"))
    # the dtype is the logits' outside autocast (the docstring's promise)
    assert dtl_loss(DTLOutput(*(o.bfloat16() for o in out)), y).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# float64, other devices
# --------------------------------------------------------------------------------------------
def test_float64_and_cpu_paths_agree():
    torch.manual_seed(4)
    ref = DTL(NUM_CLASSES, **TINY, backend="reference").double()
    auto = copy.deepcopy(ref).set_backend("auto")
    images, videos, L, y = _batch(dtype=torch.float64)
    got, want = _step(auto, images, videos, L, y), _step(ref, images, videos, L, y)
    for name, o, r in zip(DTLOutput._fields, got[0], want[0]):
        assert o.dtype == torch.float64
        assert_rel_close(f"float64 logits.{name}", o, r, 1e-10)
    for name, r in want[3].items():
        assert got[3][name].dtype == torch.float64
        assert rel_err(got[3][name], r) <= 1e-9 or float(r.norm()) < 1e-12, name
    # float32 of the same weights is close to float64 (the model is not ill-conditioned)
    ref32 = copy.deepcopy(ref).float()
    with torch.no_grad():
        out32 = ref32(images.float(), videos.float(), L)
    assert_rel_close("float32 vs float64 logits.fused", out32.fused, want[0][2], 1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_gpu_fused_matches_reference(device, rnn):
    """CUDA, a realistic small size: fused Triton kernels vs the eager reference (TF32 off), and
    a bf16 autocast step that stays finite. Lengths on the CPU (as a DataLoader gives them)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(5)
        ref = DTL(10, rnn=rnn, backend="reference").to(device)
        fused = copy.deepcopy(ref).set_backend("fused")
        lengths = tuple(int(v) for v in torch.randint(4, 9, (16,)))
        images, videos, L, y = _batch(16, lengths, size=32, T=8, device=device)
        y = y % 10
        want = _step(ref, images, videos, L, y)
        got = _step(fused, images, _pad_with(videos, L, float("nan")), L, y)
        for name, o, r in zip(DTLOutput._fields, got[0], want[0]):
            assert_rel_close(f"cuda {rnn} logits.{name}", o, r, 2e-3)
        assert_param_grads_close(f"cuda {rnn}", got[3], want[3], 2e-2, floor=1e-2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused(images, videos, L.to(device))
            loss = dtl_loss(out, y)
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - want[1].item()) < 0.1 * want[1].item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
