"""DTL without host synchronisation: the static-shape mode (every frame slot encoded, lengths
kept on their device) against the default mode, torch.compile(fullgraph=True) of the fused
model with no graph break (the CPU proxy for capture safety: a graph break is where a host
read or a data-dependent shape would be), and on a GPU a whole training step (forward,
dtl_loss, backward, Adam(capturable=True)) captured in a torch.cuda.CUDAGraph and replayed
against the same steps run eagerly."""
import copy

import pytest
import torch

from dtl_fast.models import DTL, VideoBaseline, dtl_loss

from _helpers import assert_rel_close, rel_err
from test_models import NUM_CLASSES, TINY, _batch, _pad_with, _step


def _tiny(backend="reference", dtype=torch.float64, **kw):
    torch.manual_seed(3)
    return DTL(NUM_CLASSES, **dict(TINY, **kw), backend=backend).to(dtype)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_static_mode_equals_default_mode(backend):
    """Same function, same gradients (float64: only the order of the encoder's batch differs),
    padded frames holding NaN included: in static mode they are encoded as zeros and masked."""
    model = _tiny(backend)
    images, videos, L, y = _batch(3, (3, 1, 2), T=4, dtype=torch.float64)
    want = _step(model, images, videos, L, y)
    static = copy.deepcopy(model)
    static.static_shapes = True
    got = _step(static, images, _pad_with(videos, L, float("nan")), L, y)
    for name, g, w in zip(("image", "video", "fused"), got[0], want[0]):
        assert_rel_close(f"static logits.{name}", g, w, 1e-12)
    assert_rel_close("static images grad", got[2][0], want[2][0], 1e-10)
    pad = torch.arange(4)[None, :] >= L[:, None]
    assert torch.equal(got[2][1][pad], torch.zeros_like(got[2][1][pad]))  # nothing flows there
    assert_rel_close("static videos grad", got[2][1][~pad], want[2][1][~pad], 1e-10)
    for name, w in want[3].items():
        assert rel_err(got[3][name], w) <= 1e-10 or float(w.norm()) < 1e-14, name


def test_video_baseline_static_mode_equals_default_mode():
    torch.manual_seed(4)
    model = VideoBaseline(NUM_CLASSES, width=8).double()
    _, videos, L, _ = _batch(3, (3, 1, 2), T=4, dtype=torch.float64)
    want = model(videos, L)
    model.static_shapes = True
    got = model(_pad_with(videos, L, float("nan")), L)
    assert_rel_close("static baseline logits", got, want, 1e-12)


def test_static_mode_keeps_device_lengths_and_checks_them():
    model = _tiny()
    model.static_shapes = True
    images, videos, L, _ = _batch(2, (2, 1), T=3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[1, T\]"):
        model(images, videos, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"lengths\[b\] must lie in \[1, T\]"):
        model(images, videos, torch.tensor([0, 1]))


def _explain(model, *args):
    return torch._dynamo.explain(model)(*args)


@pytest.mark.slow
def test_compile_fullgraph_fused_dtl_no_graph_break():
    """The fused model (Triton kernels in the interpreter, the C++ pooling op) traces as ONE
    graph (torch._dynamo.explain: 0 breaks), and torch.compile(fullgraph=True) of it gives the
    eager model's logits and every parameter gradient."""
    torch._dynamo.reset()
    model = _tiny("fused", torch.float32)
    images, videos, L, y = _batch(2, (3, 1), T=3)
    ex = _explain(model, images, videos, L)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    want = _step(model, images, videos, L, y)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _step(compiled, images, videos, L, y)
    for name, g, w in zip(("image", "video", "fused"), got[0], want[0]):
        assert_rel_close(f"compiled logits.{name}", g, w, 1e-5)
    for name, w in want[3].items():
        g = got[3].get(name) if name in got[3] else got[3][f"_orig_mod.{name}"]
        assert rel_err(g, w) <= 1e-4 or float(w.norm()) < 1e-7, name


@pytest.mark.slow
def test_compile_auto_dtl_breaks_only_in_the_rnn_op():
    """backend auto on CPU (native RNN, C++ pooling, SDPA attention): the model's own code and
    the attention / pooling modules add no graph break; the breaks left are at the RNN modules,
    whose PyTorch kernels run outside the graph as torch.nn.LSTM's do (with lengths
    pack_padded_sequence of CPU lengths, a data-dependent shape; without them torch.lstm would
    decompose into a loop over T), which static capture therefore avoids by running the fused
    RNN."""
    torch._dynamo.reset()
    model = _tiny("auto", torch.float32)
    images, videos, L, _ = _batch(2, (3, 1), T=3)
    ex = _explain(model, images, videos, L)
    for r in ex.break_reasons:
        where = r.user_stack[-1].filename.replace("\\", "/") if r.user_stack else "?"
        assert where.endswith(("/dtl_fast/nn/rnn.py", "/dtl_fast/ops/rnn.py")), (where, r.reason[:200])


@pytest.mark.slow
def test_compile_grouped_per_head_calls_no_graph_break():
    """The grouped form's op calls over stacked heads (a DAM layer's intra_v + short-term with a
    window per head; the feature exchange at Na == Nb with per-head key lengths [B, 2H] built
    from the two directions' lengths) trace as ONE graph with no break (backend auto: the
    composite on CPU) and give the eager outputs and gradients."""
    from dtl_fast.nn import DualModalAttention, FeatureExchange
    from dtl_fast.nn import attention as A

    torch.manual_seed(5)

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fe = FeatureExchange(8, 12, 16, 2)
            self.dam = DualModalAttention(16, 2, num_layers=1, window=1, num_memory=2, mlp_ratio=0.0)

        def forward(self, a, b, la, lb):
            a, b = self.fe(a, b, la, lb)
            return self.dam(a, b, la, lb)

    model = Both()
    model.fe.backend = model.dam.backend = "auto"
    assert A.use_grouped(model.fe) and A.use_grouped(model.dam.layers[0])
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 12)
    la, lb = torch.tensor([4, 1]), torch.tensor([2, 0])
    torch._dynamo.reset()
    ex = _explain(model, a, b, la, lb)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (a, b)]
    want = model(*leaves, la, lb)
    sum(o.square().sum() for o in want).backward()
    want_grads = [t.grad for t in leaves] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    leaves = [t.clone().requires_grad_() for t in (a, b)]
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(*leaves, la, lb)
    sum(o.square().sum() for o in got).backward()
    got_grads = [t.grad for t in leaves] + [p.grad for p in model.parameters()]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(f"compiled output {i}", g, w, 1e-5)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_rel_close(f"compiled grad {i}", g, w, 1e-4)


# --------------------------------------------------------------------------------------------
# GPU: capture a whole training step
# --------------------------------------------------------------------------------------------
def _graphed_step(model, opt, static_in):
    """Warm-up on a side stream, then capture forward + dtl_loss + backward + Adam step."""
    images, videos, lengths, labels = static_in

    def step():
        opt.zero_grad(set_to_none=False)
        loss = dtl_loss(model(images, videos, lengths), labels)
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = step()
    return g, static_loss


@pytest.mark.gpu
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_gpu_cuda_graph_training_step_matches_eager(rnn):
    """Capture the fused training step with lengths in a device buffer (static-shape mode),
    replay it on new batches copied into the buffers, and compare the parameters after N steps
    with the same steps run eagerly from the same start (the same warm-up steps included)."""
    dev = "cuda"
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(7)
        base = DTL(10, rnn=rnn, width=16, hidden_size=32, dim=32, num_heads=2, num_layers=1,
                   backend="fused").to(dev)
        base.static_shapes = True
        B, T = 8, 6
        batches = []
        for i in range(4):
            L = torch.randint(1, T + 1, (B,))
            images, videos, _, y = _batch(B, tuple(L.tolist()), size=16, T=T, device=dev, seed=i)
            batches.append((images, videos, L, (y % 10)))
        graphed, eager = copy.deepcopy(base), copy.deepcopy(base)
        opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
        opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
        images, videos, L, y = batches[0]
        static_in = (images.clone(), videos.clone(), L.to(dev), y.clone())
        g, static_loss = _graphed_step(graphed, opt_g, static_in)  # 3 warm-up steps + capture
        for _ in range(3):  # the eager twin takes the same warm-up steps
            opt_e.zero_grad(set_to_none=False)
            dtl_loss(eager(*static_in[:3]), y).backward()
            opt_e.step()
        losses = []
        for images, videos, L, y in batches:
            for buf, new in zip(static_in, (images, videos, L.to(dev), y)):
                buf.copy_(new)
            g.replay()
            losses.append(static_loss.clone())
            opt_e.zero_grad(set_to_none=False)
            loss = dtl_loss(eager(images, videos, L.to(dev)), y)
            loss.backward()
            opt_e.step()
            assert_rel_close("replayed loss", losses[-1], loss.detach(), 1e-4)
        torch.cuda.synchronize()
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            assert torch.isfinite(p).all(), name
            assert rel_err(p.detach(), q.detach()) <= 1e-4, name
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cpu-lengths", "static-device-lengths"])
def test_gpu_fused_step_does_no_host_sync(where, monkeypatch):
    """forward + dtl_loss + backward of the fused model under
    torch.cuda.set_sync_debug_mode("error") (any host synchronisation raises): CPU lengths in
    the default mode (checked on the host, copied without waiting), and device lengths in the
    static mode as under capture (outside capture the model's range check of device lengths
    is one deliberate host read; torch.cuda.is_current_stream_capturing is patched to say
    "capturing", so the model takes its capture path: the asynchronous device assert)."""
    torch.manual_seed(2)
    model = DTL(10, width=16, hidden_size=32, dim=32, num_heads=2, num_layers=1,
                backend="fused").cuda()
    images, videos, L, y = _batch(4, (3, 1, 2, 3), size=16, T=3, device="cuda")
    y = y % 10
    lengths = L
    if where == "static-device-lengths":
        model.static_shapes = True
        lengths = L.cuda()
    dtl_loss(model(images, videos, lengths), y).backward()  # first call: caches, autotuning
    torch.cuda.synchronize()
    if where == "static-device-lengths":
        # every capture check (dtl_fast._checks.device_capturing and the modules' `capturing`)
        # asks torch.cuda.is_current_stream_capturing at call time: patch that one source (no
        # optimizer runs here, the one torch caller that would care)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dtl_loss(model(images, videos, lengths), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
