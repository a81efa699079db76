"""The RNN and attention benchmark modules run end to end on tiny CPU shapes (gate, timing, CSV,
acceptance), and their correctness gate stops a provider that computes the wrong thing."""
import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cosine_attention as BA  # noqa: E402
import bench_rnn as BR  # noqa: E402
import harness as H  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: a second thread only adds wake-up latency (and stalls on a busy machine);
    # the thread count is restored for the tests that run after these
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(tmp_path, **kw):
    a = argparse.Namespace(device="cpu", quick=True, out=str(tmp_path), no_plot=True,
                           time_budget=None, cold_cache=False, threads=1, run_id="smoke",
                           standin=False, tiny=True)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _statuses(rows, provider):
    return [r["status"] for r in rows if r["provider"] == provider]


# each tiny case runs once in one of the two tests (LSTM here, GRU below; attention: key padding
# and window + memory here, the plain case below), so both stay a few seconds
@pytest.mark.parametrize("mod,cases", [
    (BR, [c for c in BR.CPU_TINY if c.cell == "lstm"]),
    (BA, [c for c in BA.CPU_TINY if c.variant != "plain"]),
], ids=["rnn", "cosine_attention"])
def test_bench_runs_and_gates_pass(mod, cases, tmp_path):
    assert cases
    rows = mod.run(_args(tmp_path, cases=cases))
    assert rows, "no rows"
    bad = [(r["provider"], r["mode"], r["status"]) for r in rows
           if not r["status"].startswith(("ok", "skipped"))]
    assert not bad, bad
    provs = [mod.BASELINE, "reference", "dtl_fast"]
    if mod is BR:  # the compiled pairs, padded and with lengths (the LSTM's tiny case)
        provs += [BR.NN_COMPILED, BR.AUTO_COMPILED, BR.PACKED, BR.AUTO_LEN]
    for prov in provs:
        st = _statuses(rows, prov)
        assert st and all(s == "ok" for s in st), (prov, st)
    # the fused kernels on CPU are never timed, and say so
    assert all(s.startswith("skipped") for s in _statuses(rows, "dtl_fast:fused"))
    # rows reach the CSV with the environment stamp
    on_disk = H.read_rows(Path(tmp_path) / f"{mod.KERNEL}.csv")
    assert len(on_disk) == len(rows) and on_disk[0]["device_name"] and on_disk[0]["torch"]
    figs = mod.acceptance(on_disk, "cpu")
    assert figs and all(f.get("number") is not None for f in figs), figs
    # GPU figures from CPU rows: every one says unmeasured, none passes
    gfigs = mod.acceptance(on_disk, "cuda")
    assert gfigs and not any(f["passed"] for f in gfigs)
    assert all("unmeasured" in f["value"] for f in gfigs), gfigs


def _wrong_rnn(cell):
    def fn(x, hx, weights, **kw):
        out, state = BR._standin_native(cell, x, hx, weights, **kw)
        return out * 1.01, state  # 1 % off: far outside float32's tolerance
    return fn


def _wrong_attention(q, k, v, ls, kl=None, w=None, mk=None, mv=None, backend=None):
    return BA._standin_composite(q, k.flip(2), v, ls, kl, w, mk, mv)  # keys in the wrong order


@pytest.mark.parametrize("mod,override,cases", [
    (BR, {c: _wrong_rnn(c) for c in ("lstm", "gru")}, [c for c in BR.CPU_TINY if c.cell == "gru"]),
    (BA, _wrong_attention, [c for c in BA.CPU_TINY if c.variant == "plain"]),
], ids=["rnn", "cosine_attention"])
def test_gate_stops_a_wrong_provider(mod, override, cases, tmp_path):
    assert len(cases) == 1
    rows = mod.run(_args(tmp_path, standin=True, fused_override=override, cases=cases))
    st = _statuses(rows, "dtl_fast")
    assert len(st) == 2 and all(s.startswith("gate-failed") for s in st), st
    assert all(r["median_ms"] == "" for r in rows if r["provider"] == "dtl_fast")
    # the baseline and the reference still pass and are timed
    assert all(s == "ok" for s in _statuses(rows, mod.BASELINE))
    # a red gate never passes a figure
    base = {"kernel": mod.KERNEL}
    figs = mod.acceptance([dict(r, **base) for r in rows], "cpu")
    assert figs and not any(f["passed"] for f in figs)


# ---- acceptance on synthetic CUDA rows: a truncated grid never PASSes a figure -----------------

_FAKE_GPU = dict(device="cuda", device_name="fake GPU", torch="t", triton="t", cuda="c",
                 git_rev="test")


def _gpu_rows(mod, cases, ratio, x_eager):
    """dtl_fast (fused) and dtl_fast:auto rows with the given ratio (and x_eager) for every
    case and mode."""
    rows = []
    for variant, shape, dtype in cases:
        for mode in mod.MODES:
            for provider in ("dtl_fast", "dtl_fast:auto"):
                rows.append(H.make_row(kernel=mod.KERNEL, provider=provider, mode=mode,
                                       variant=variant, shape=shape, dtype=dtype, stamp=_FAKE_GPU,
                                       timing=(1.0, 0.99, 1.01), baseline=mod.BASELINE,
                                       baseline_ms=ratio, extra={"x_eager": x_eager}, run_id="g"))
    return rows


def test_rnn_auto_figure_fails_below_parity():
    """`auto` >= 0.95x torch.nn everywhere: one case at 0.9x fails it; no auto rows = unmeasured."""
    rows = _gpu_rows(BR, _RNN_CASES, ratio=50.0, x_eager=100.0)
    slow = H.make_row(kernel=BR.KERNEL, provider="dtl_fast:auto", mode="forward",
                      variant="gru-bi", shape="64x16x256", dtype="float32", stamp=_FAKE_GPU,
                      timing=(1.0, 0.99, 1.01), baseline=BR.BASELINE, baseline_ms=0.9,
                      extra={}, run_id="g")
    figs = {f["name"]: f for f in BR.acceptance(rows + [slow], "cuda")}
    auto_fwd = [f for n, f in figs.items() if "auto >=" in n and "forward " in n]
    assert len(auto_fwd) == 1 and not auto_fwd[0]["passed"], auto_fwd
    assert all(f["passed"] for n, f in figs.items() if "auto >=" in n and "backward" in n)
    no_auto = [r for r in rows if r["provider"] != "dtl_fast:auto"]
    figs = [f for f in BR.acceptance(no_auto, "cuda") if "auto >=" in f["name"]]
    assert figs and not any(f["passed"] for f in figs)


def _not_run_rows(mod, cases):
    return [H.make_row(kernel=mod.KERNEL, provider="(all)", mode=mode, variant=v, shape=s,
                       dtype=d, stamp=_FAKE_GPU, timing=None, baseline=mod.BASELINE,
                       baseline_ms=None, run_id="g",
                       status="skipped: time budget spent before this case")
            for v, s, d in cases for mode in mod.MODES]


_RNN_CASES = [("lstm-bi", "16x128x256", "bfloat16"), ("gru-bi", "16x128x256", "bfloat16")]
_RNN_CUT = [("lstm-uni", "64x128x256", "float32"), ("gru-bi", "128x512x1024", "bfloat16")]
_ATT_CASES = [("pad", "64x4x16x32", "bfloat16"), ("pad", "4x16x1024x64", "bfloat16"),
              ("plain", "4x16x2048x64", "bfloat16")]
_ATT_CUT = [("plain", "64x8x32x64", "float32"), ("pad", "4x16x4096x128", "float16")]


@pytest.mark.parametrize("mod,cases,cut", [(BR, _RNN_CASES, _RNN_CUT), (BA, _ATT_CASES, _ATT_CUT)],
                         ids=["rnn", "cosine_attention"])
def test_gpu_acceptance_truncated_grid_fails(mod, cases, cut):
    full = _gpu_rows(mod, cases, ratio=50.0, x_eager=100.0)  # far above every target
    figs = mod.acceptance(full, "cuda")
    assert figs and all(f["passed"] for f in figs), [(f["name"], f["value"]) for f in figs]
    figs = mod.acceptance(full + _not_run_rows(mod, cut), "cuda")
    by_name = {f["name"]: f for f in figs}
    every = [f for n, f in by_name.items() if "everywhere" in n or "DTL-sized" in n
             or "long (N>=1k)" in n or "key padding" in n]
    assert every
    for f in every:
        assert not f["passed"] and "not run" in f["value"], f
        assert f.get("incomplete")
    # run.py's median over repeated runs keeps an incomplete figure failed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import run as RUN

    folded = RUN._median_over_runs([figs, mod.acceptance(full, "cuda")])
    for f in folded:
        if f["name"] in {e["name"] for e in every}:
            assert not f["passed"], f


def test_frame_pool_acceptance_counts_cut_cases():
    import bench_frame_pool as BP

    rows = [H.make_row(kernel=BP.KERNEL, provider="(all)", mode="forward", variant="mean",
                       shape="256x256x1024", dtype="float32", stamp=_FAKE_GPU, timing=None,
                       baseline=BP.BASELINE, baseline_ms=None, run_id="g",
                       status="skipped: time budget spent before this case")]
    figs = BP.acceptance(rows, "cuda")
    assert figs and not any(f["passed"] for f in figs)
    assert any("not run" in f["value"] for f in figs), figs


@pytest.mark.parametrize("mod", [BR, BA], ids=["rnn", "cosine_attention"])
def test_time_budget_zero_runs_nothing_and_says_so(mod, tmp_path):
    rows = mod.run(_args(tmp_path, time_budget=0.0))
    assert rows and all(r["provider"] == "(all)" for r in rows)
    assert all(r["status"].startswith("skipped: time budget") for r in rows)
    figs = mod.acceptance(rows, "cpu")
    assert figs and not any(f["passed"] for f in figs)
    assert any("not run" in f["value"] for f in figs), figs


def test_run_py_time_budget_zero(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import run as RUN

    rc = RUN.main(["--device", "cpu", "--quick", "--only", "bench_rnn", "--time-budget", "0",
                   "--out", str(tmp_path), "--no-plot", "--no-summary-file", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "time budget spent: bench_rnn skipped" in out
    assert not list(Path(tmp_path).glob("summary_*.txt"))  # --no-summary-file


def test_gpu_check_script_parses():
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    res = subprocess.run([bash, "-n", str(script)], check=False, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr


# ---- the DTL training-step benchmark -----------------------------------------------------------

def test_dtl_bench_runs_and_its_gate_stops_a_wrong_model(tmp_path):
    import bench_dtl as BD

    rows = BD.run(_args(tmp_path, cases=BD.CPU_TINY))
    assert all(s == "ok" for s in _statuses(rows, "reference") + _statuses(rows, "fused")), rows
    assert _statuses(rows, "fused") and _statuses(rows, "reference")
    # not timed on a CPU, and each row says why
    assert all(s.startswith("skipped") for s in _statuses(rows, "compiled") + _statuses(rows, "fused:triton"))
    on_disk = H.read_rows(Path(tmp_path) / "dtl.csv")
    assert len(on_disk) == len(rows)
    gfigs = BD.acceptance(on_disk, "cuda")  # GPU figures from CPU rows: unmeasured, never passed
    assert gfigs and not any(f["passed"] for f in gfigs)

    def wrong(model):  # the fused model's classifier bias off by 0.01: the gate must see it
        with torch.no_grad():
            model.predictor[-1].bias.add_(0.01)
        return model

    rows = BD.run(_args(tmp_path / "wrong", cases=BD.CPU_TINY, fused_override=wrong))
    st = _statuses(rows, "fused")
    assert st and all(s.startswith("gate-failed") for s in st), st
    assert all(s == "ok" for s in _statuses(rows, "reference"))


def test_host_overhead_bench_runs_and_restores_the_kernels(tmp_path, monkeypatch):
    import host_overhead as HO
    from dtl_fast.kernels import cosine_attention as ka
    real = ka.cosine_attention_forward
    monkeypatch.setattr(HO, "ROUNDS", 1)
    assert HO.main(["--device", "cpu", "--out", str(tmp_path), "--calls", "2", "--threads", "1"]) == 0
    assert ka.cosine_attention_forward is real  # the stubs are gone again
    rows = H.read_rows(tmp_path / "host_overhead.csv")
    got = {(r["variant"], r["mode"], r["provider"]) for r in rows}
    assert got == {(op, mode, path) for op in ("attention", "lstm", "gru")
                   for mode in ("forward", "forward+backward") for path in ("eager", "op")}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["ratio"]) == 1.0 for r in rows if r["provider"] == "op")


def test_zero_pages_ab_script_runs_both_sides(tmp_path, capsys):
    # bench/ab_frame_pool_grad_alloc.py: one pair at the smallest shape that takes the path;
    # each side's child must report the switch as it was set (the script stops otherwise).
    from dtl_fast._extension import _C

    # the op's own pages at all (Linux, glibc, torch's allocator): the children set both
    # switches themselves (zero pages on / off, the cache off on both sides)
    if not (_C.cpu_grad_on_zero_pages(66 << 20) or _C.cpu_grad_from_cache(66 << 20)):
        pytest.skip("the op's own gradient pages are off in this process")
    import ab_frame_pool_grad_alloc as AB

    out = tmp_path / "ab.csv"
    assert AB.main(["--shape", "8x64x16384", "--threads", "1", "--pairs", "1", "--calls", "1",
                    "--csv", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4  # header, (mean, max) x (torch allocator, zero pages)
    assert "zero pages" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        AB.main(["--shape", "8x64", "--pairs", "1"])


def test_grad_cache_ab_script_runs_both_sides(tmp_path, capsys):
    # the same script on the cache switch, through autograd.grad; a CSV with another header
    # (the zero-page rows' older one) is refused, not mixed.
    from dtl_fast._extension import _C

    if not _C.cpu_grad_from_cache(4 << 20):
        pytest.skip("the CPU gradient cache is off in this process")
    import ab_frame_pool_grad_alloc as AB

    out = tmp_path / "ab.csv"
    argv = ["--switch", "cache", "--through", "autograd", "--shape", "8x64x2048", "--threads",
            "1", "--pairs", "1", "--calls", "2", "--csv", str(out)]
    assert AB.main(argv) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].endswith("switch,through,faults_per_call")
    assert "grad cache" in capsys.readouterr().out
    old = tmp_path / "old.csv"
    old.write_text("timestamp,pair,side,mode,shape,dtype,threads,calls,median_ms,min_ms\n")
    with pytest.raises(SystemExit, match="header"):
        AB.main(argv[:-1] + [str(old)])
    assert old.read_text().count("\n") == 1


def test_nt_store_ab_script_runs_both_sides(tmp_path, capsys):
    # the same script on the non-temporal store switch: every row streamed (the old writers)
    # against the cache rule, at a size whose bulk rows the rule keeps in the cache here
    import os

    from dtl_fast._extension import _C

    if os.environ.get("DTL_FAST_CPU_NT_STORE_MIN_MB") or 4 << 20 >= 2 * _C.cpu_nt_store_rule()[0]:
        pytest.skip("4 MiB gradients are streamed in this process")
    import ab_frame_pool_grad_alloc as AB

    out = tmp_path / "ab.csv"
    argv = ["--switch", "nt-stores", "--through", "autograd", "--shape", "8x64x2048",
            "--threads", "1", "--pairs", "1", "--calls", "2", "--csv", str(out)]
    assert AB.main(argv) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4 and sum("nt-stores" in r for r in rows) == 4
    text = capsys.readouterr().out
    assert "all streamed" in text and "cache rule" in text


def test_time_steady_rotates_calls_and_times_streams():
    # harness.time_steady (issue 13, s24): a stream of back-to-back calls, fns[i % len(fns)] in
    # turn, timed as a whole; the per-call time is stream time / calls.
    counts = [0, 0, 0]

    def call(i):
        counts[i] += 1
        time.sleep(0.002)

    med, p20, p80 = H.time_steady([lambda i=i: call(i) for i in range(3)], device="cpu",
                                  target_ms=10.0, repeats=3)
    assert 2.0 <= p20 <= med <= p80 < 50.0  # ms per call: each sleeps 2 ms
    assert counts[0] == counts[1] == counts[2] > 3
    with pytest.raises(ValueError, match="at least one"):
        H.time_steady([], device="cpu")
    copy = H.copy_bandwidth_steady("cpu", nbytes=1 << 20)
    assert copy["copy_gbps"] > 0 and copy["copy_bytes"] == 2 << 20


def test_frame_pool_gpu_figures_read_the_steady_state_fraction():
    # The GPU acceptance figures compare the op and the copy both timed in steady state
    # (pct_copy_steady), not do_bench's pct_copy, whose flush charges a read-only op for the
    # L2's dirty lines (bench/NOTES.md, issue 13, s24).
    import bench_frame_pool as BP

    def row(mode, variant, **extra):
        return H.make_row(kernel=BP.KERNEL, provider="dtl_fast", mode=mode, variant=variant,
                          shape="256x256x1024", dtype="float32", stamp=_FAKE_GPU,
                          timing=(0.06, 0.06, 0.06), baseline=BP.BASELINE, baseline_ms=0.5,
                          run_id="g", extra=extra)

    ref = H.make_row(kernel=BP.KERNEL, provider=BP.BASELINE, mode="forward", variant="mean",
                     shape="256x256x1024", dtype="float32", stamp=_FAKE_GPU,
                     timing=(0.5, 0.5, 0.5), baseline=BP.BASELINE, baseline_ms=0.5, run_id="g")
    rows = [ref]
    for variant in ("mean", "max", "meanmax"):
        rows.append(row("forward", variant, pct_copy=74.0, pct_copy_steady=90.0))
        rows.append(row("forward+backward", variant, pct_copy=88.0, pct_copy_steady=79.0))
    figs = BP.acceptance(rows, "cuda")
    fwd = [f for f in figs if f["name"].startswith("gpu forward ")]
    both = [f for f in figs if f["name"].startswith("gpu forward+backward")]
    assert len(fwd) == len(both) == 3
    assert all(f["passed"] and f["number"] == 90.0 and "steady" in f["name"] for f in fwd), fwd
    assert all("do_bench 74.0%" in f["value"] for f in fwd), fwd  # shown beside it
    assert not any(f["passed"] for f in both), both  # 79 % steady, whatever do_bench said
    # a row without the steady-state figure (a run before it existed) does not pass, and a
    # steady-state timing that failed says why
    old = [ref, row("forward", "mean", pct_copy=95.0)]
    f = [f for f in BP.acceptance(old, "cuda") if f["name"].startswith("gpu forward ")][0]
    assert not f["passed"] and f["value"] == "n/a (do_bench 95.0%)", f
    failed = [ref, row("forward", "mean", pct_copy=95.0, steady="error: out of memory")]
    f = [f for f in BP.acceptance(failed, "cuda") if f["name"].startswith("gpu forward ")][0]
    assert not f["passed"] and f["value"].startswith("steady error: out of memory"), f
    # "noisy" on a steady figure is the steady streams' own p20-p80 spread, not do_bench's
    quiet = [ref, row("forward", "mean", pct_copy=74.0, noisy=True, pct_copy_steady=90.0,
                      steady_ms=0.05, steady_p20_ms=0.049, steady_p80_ms=0.051)]
    f = [f for f in BP.acceptance(quiet, "cuda") if f["name"].startswith("gpu forward ")][0]
    assert f["passed"] and "noisy" not in f["value"], f
    spread = [ref, row("forward", "mean", pct_copy=74.0, pct_copy_steady=90.0,
                       steady_ms=0.05, steady_p20_ms=0.04, steady_p80_ms=0.07)]
    f = [f for f in BP.acceptance(spread, "cuda") if f["name"].startswith("gpu forward ")][0]
    assert f["value"].startswith("90.00%, noisy p20-p80"), f


def test_frame_pool_steady_ms_runs_both_modes():
    # bench_frame_pool.steady_ms is only called on a GPU; its two forms (forward, and
    # forward+backward of an intermediate) run here on small CPU tensors.
    import bench_frame_pool as BP

    seen = []

    def fn(xx, variant):
        seen.append((xx.data_ptr(), xx.requires_grad, variant))
        return xx.sum(1)

    x, g = torch.randn(2, 5, 3), torch.randn(2, 3)
    for mode in ("forward", "forward+backward"):
        seen.clear()
        info = {}
        med, p20, p80 = BP.steady_ms(fn, x, "mean", mode, g, "cpu", info)
        assert 0 < p20 <= med <= p80
        assert info["host_ms"] > 0 and info["host_bound"]  # on a CPU the host is the device
        assert len({p for p, _, _ in seen}) == BP.STEADY_COPIES  # rotates over the copies
        assert all(rg == (mode != "forward") and v == "mean" for _, rg, v in seen)


def test_frame_pool_argmax_provider_asks_the_op_for_its_argmax(monkeypatch):
    # "dtl_fast:argmax" (CUDA rows only) times the kernel a training forward runs, beside
    # "dtl_fast"'s index-free one: it must call the registered op with with_argmax=True, pool
    # what the reference pools, and exist only where the op is dtl_fast's (not the stand-in).
    import bench_frame_pool as BP
    from dtl_fast import ops, reference

    x, lengths = torch.randn(3, 9, 8), torch.tensor([9, 0, 4])
    provs = BP.make_providers(reference.frame_pool, ops.frame_pool, x, lengths, "cuda")
    calls = []
    real = torch.ops.dtl_fast.frame_pool

    class Spy:  # torch.ops.dtl_fast.frame_pool, recording its with_argmax argument
        def __call__(self, *args):
            calls.append(args[3:])
            return real(*args)

    monkeypatch.setattr(torch.ops.dtl_fast, "frame_pool", Spy())
    for mode in ("max", "meanmax"):
        torch.testing.assert_close(provs[BP.ARGMAX](x, mode), reference.frame_pool(x, lengths, mode))
    assert calls == [(True,), (True,)], calls
    assert BP.ARGMAX not in BP.make_providers(reference.frame_pool, ops.frame_pool, x, lengths,
                                              "cpu")
    assert BP.ARGMAX not in BP.make_providers(BP._standin_reference, BP._standin_fused, x,
                                              lengths, "cuda")


def test_frame_pool_bench_runs_on_cpu_and_rows_say_which_kernels(tmp_path, monkeypatch):
    # bench_frame_pool end to end at one tiny CPU shape: every provider passes its gate and is
    # timed, and each row says which kernels ran, ATen's (the eager forms' speed depends on
    # ATEN_CPU_CAPABILITY) and, for ours, the C++ forward's instruction set; the CPU figures
    # show the first.
    import bench_frame_pool as BP
    import dtl_fast

    monkeypatch.setattr(BP, "CPU_SHAPES", [((3, 7, 40), torch.float32)])
    rows = BP.run(_args(tmp_path))
    bad = [(r["provider"], r["mode"], r["variant"], r["status"]) for r in rows
           if not r["status"].startswith("ok")]
    assert not bad, bad
    cap = str(torch.backends.cpu.get_cpu_capability())
    ours = dtl_fast.info()["cpu_kernel_isa"]
    for r in rows:
        ex = json.loads(r["extra"])
        assert ex["aten_cpu"] == cap, (r["provider"], ex)
        assert ex.get("isa") == (ours if r["provider"].startswith("dtl_fast") else None), ex
    # the figures read shapes this run did not time: relabel the rows to see their values
    relabelled = [dict(r, shape=s) for r in rows for s in ("64x64x1024", "256x32x2048")]
    figs = BP.acceptance(relabelled, "cpu")
    assert len(figs) == 8 and all(f.get("number") is not None for f in figs), figs
    assert all(f["value"].endswith(f"eager on ATen {cap}") for f in figs), figs
    # run.py's summary line says it too, and says when rows of two capabilities are mixed
    import run as RUN

    assert RUN._aten_cpu(rows) == cap
    other = "AVX2" if cap != "AVX2" else "DEFAULT"
    mixed = rows + [dict(rows[0], extra=json.dumps({"aten_cpu": other}))]
    assert RUN._aten_cpu(mixed) == f"mixed: {cap}, {other}"


def test_time_after_runs_its_setup_before_every_timed_call():
    # harness.time_after (the sweep's "produced" method): `before` runs ahead of each call and
    # outside its time; on a CPU device each call is timed on the wall clock.
    order = []

    def before():
        order.append("before")
        time.sleep(0.002)  # outside the timed region: must not show in the times

    def fn():
        order.append("call")

    med, p20, p80 = H.time_after(fn, before, device="cpu", warmup=5, rep=10)
    assert 0 <= p20 <= med <= p80 < 1.0, (p20, med, p80)  # ms: the 2 ms sleep is not in it
    assert len(order) >= 6 and order[::2] == ["before"] * (len(order) // 2)
    assert order[1::2] == ["call"] * (len(order) // 2)


# ---- bench/run.py's arguments: a typo or an unknown run id is an error, never an empty summary --

_FAKE_CPU = dict(_FAKE_GPU, device="cpu", device_name="fake CPU")


def _run_py():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import run as RUN

    return RUN


def _rnn_rows_of_runs(run_ids, ratios):
    """One dtl_fast row (lstm-bi 4x8x32 forward, the given ratio) per run id."""
    return [H.make_row(kernel=BR.KERNEL, provider="dtl_fast", mode="forward", variant="lstm-bi",
                       shape="4x8x32", dtype="float32", stamp=_FAKE_CPU, timing=(1.0, 1.0, 1.0),
                       baseline=BR.BASELINE, baseline_ms=x, run_id=rid)
            for rid, x in zip(run_ids, ratios)]


@pytest.mark.parametrize("only", ["frame_poo", "bench_framepool"])
def test_run_py_unknown_only_is_an_error_before_anything_runs(only, tmp_path, capsys):
    RUN = _run_py()
    sentinel = tmp_path / "summary.txt"
    sentinel.write_text("the committed summary\n")
    with pytest.raises(SystemExit) as exc:
        RUN.main(["--device", "cpu", "--only", only, "--out", str(tmp_path / "out"),
                  "--summary-file", str(sentinel)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err and repr(only) in err
    assert all(m in err for m in RUN.MODULES), err  # the valid names
    assert sentinel.read_text() == "the committed summary\n"
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        RUN.main(["--device", "cpu", "--repeat", "0", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--repeat" in capsys.readouterr().err


def test_run_py_only_takes_the_short_name(tmp_path, capsys):
    RUN = _run_py()
    assert RUN.resolve_only(["frame_pool", "bench_rnn"]) == ["bench_frame_pool", "bench_rnn"]
    assert RUN.resolve_only(None) == RUN.MODULES
    rc = RUN.main(["--device", "cpu", "--only", "frame_pool", "--time-budget", "0",
                   "--out", str(tmp_path), "--no-summary-file", "--threads", "1"])
    assert rc == 0
    assert "time budget spent: bench_frame_pool skipped" in capsys.readouterr().out


def test_run_py_summary_only_base_id_of_a_repeat_run(tmp_path, capsys):
    # the READMEs quote a --repeat run by its base id; its rows carry -r1..-rN: the summary of
    # the base id is the run's own summary (medians over the repeats), read from the CSV
    RUN = _run_py()
    w = H.ResultWriter(tmp_path, BR.KERNEL)
    ids = [f"20261129T050909-2494-r{i}" for i in (1, 2, 3, 10)]
    for r in _rnn_rows_of_runs(ids + ["20261129T050909-24940"], [1.0, 0.5, 1.2, 0.96, 9.0]):
        w.append(r)
    assert RUN.run_ids_of(tmp_path, BR.KERNEL, "20261129T050909-2494", "cpu") == ids
    assert RUN.run_ids_of(tmp_path, BR.KERNEL, ids[1], "cpu") == [ids[1]]
    assert RUN.run_ids_of(tmp_path, BR.KERNEL, "latest", "cpu") == ["20261129T050909-24940"]
    assert RUN.run_ids_of(tmp_path, BR.KERNEL, "20261129T050909", "cpu") == []
    summary = tmp_path / "summary.txt"
    rc = RUN.main(["--device", "cpu", "--summary-only", "20261129T050909-2494", "--only", "rnn",
                   "--out", str(tmp_path), "--summary-file", str(summary)])
    assert rc == 0
    text = summary.read_text()
    assert f"run {ids[-1]}" in text and "rows: 1 ok" in text
    assert "PASS  cpu forward          lstm-bi 4x8x32" in text  # median 0.98x of 1, 0.5, 1.2, 0.96
    assert "median 0.98x of 4 runs: 0.50, 0.96, 1.00, 1.20" in text, text
    capsys.readouterr()


@pytest.mark.parametrize("run_id", ["nonexistent-run", "latest"])
def test_run_py_summary_only_of_no_rows_is_an_error_and_writes_nothing(run_id, tmp_path, capsys):
    RUN = _run_py()
    w = H.ResultWriter(tmp_path, BR.KERNEL)
    for r in _rnn_rows_of_runs(["20261129T050909-2494-r1"], [1.0]):
        w.append(dict(r, device="cuda"))  # rows of another device only
    sentinel = tmp_path / "summary_cpu.txt"
    sentinel.write_text("the committed summary\n")
    for extra in (["--summary-file", str(sentinel)], []):
        with pytest.raises(SystemExit) as exc:
            RUN.main(["--device", "cpu", "--summary-only", run_id, "--out", str(tmp_path), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--summary-only" in err and ("any run" if run_id == "latest" else run_id) in err
    assert sentinel.read_text() == "the committed summary\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn.csv", "summary_cpu.txt"]


def test_run_py_never_writes_a_summary_of_no_rows(tmp_path, capsys):
    # a run that measured nothing (the time budget spent before the first module) prints its
    # summary but leaves the last real summary file alone
    RUN = _run_py()
    sentinel = tmp_path / "summary.txt"
    sentinel.write_text("the committed summary\n")
    rc = RUN.main(["--device", "cpu", "--only", "bench_rnn", "--time-budget", "0",
                   "--out", str(tmp_path), "--summary-file", str(sentinel), "--threads", "1"])
    assert rc == 0
    assert "no rows to summarize" in capsys.readouterr().out
    assert sentinel.read_text() == "the committed summary\n"


# ---- cut cases say "N case(s) not run" in every module's figures ---------------------------------

def test_frame_pool_cpu_figure_of_a_cut_case_says_not_run():
    import bench_frame_pool as BP

    rows = [H.make_row(kernel=BP.KERNEL, provider="(all)", mode=mode, variant="max",
                       shape="256x32x2048", dtype="float32", stamp=_FAKE_CPU, timing=None,
                       baseline=BP.BASELINE, baseline_ms=None, run_id="c",
                       status="skipped: time budget spent before this case")
            for mode in BP.CPU_TARGET]
    figs = {f["name"]: f for f in BP.acceptance(rows, "cpu")}
    cut = [f for n, f in figs.items() if "max  256x32x2048" in n]
    assert len(cut) == 2, figs
    for f in cut:
        assert not f["passed"] and f["value"] == "cut; 1 case(s) not run" and f["incomplete"], f
    # a case the grid never had (no row at all) is still "missing"
    assert all(f["value"] == "missing" for n, f in figs.items() if "64x64x1024" in n), figs


def _data_row(mode, provider, variant, status="ok", ratio=None, sps=None):
    import bench_data as BDA

    r = H.make_row(kernel=BDA.KERNEL, provider=provider, mode=mode, variant=variant,
                   shape="40x4x16x16", dtype="h264", stamp=_FAKE_CPU,
                   timing=None if status != "ok" else (10.0, 10.0, 10.0), baseline="raw",
                   baseline_ms=None, status=status, run_id="d",
                   extra={} if sps is None else {"samples_per_s": sps})
    if ratio is not None:
        r["ratio"] = H._fmt(ratio, 4)
    return r


def test_data_figures_of_cut_cases_say_not_run():
    import bench_data as BDA

    spent = "skipped: time budget spent before this case"
    # --time-budget 0: every mode is one "(all)" row
    rows = [_data_row(m, "(all)", "", spent)
            for m in ("check-first", "check-second", "prepare", "open", "loader")]
    figs = BDA.acceptance(rows, "cpu")
    assert len(figs) == 3 and not any(f["passed"] for f in figs)
    assert all("1 case(s) not run" in f["value"] and f["incomplete"] for f in figs), figs
    # the 2-worker loader cut: both loader figures fail, the 10x one despite w0's 12x
    rows = [_data_row("check-second", "raw", "check-workers=0"),
            _data_row("loader", "raw", "img16-f8-w0", sps=100.0),
            _data_row("loader", "prepared", "img16-f8-w0", ratio=12.0, sps=1200.0),
            _data_row("loader", "(all)", "img16-f8-w2", spent)]
    figs = {f["name"]: f for f in BDA.acceptance(rows, "cpu")}
    ten = figs["prepared loader >= 10x raw, same workers, demo sizes 16x8"]
    two = figs["prepared loader > 5,000 samples/s, 2 workers, demo sizes 16x8"]
    assert not ten["passed"] and ten["number"] == 12.0
    assert ten["value"].endswith("; 1 case(s) not run"), ten
    assert not two["passed"] and "1 case(s) not run" in two["value"], two
    # run.py's median over repeats keeps it failed
    folded = _run_py()._median_over_runs([list(figs.values()), list(figs.values())])
    assert not any(f["passed"] for f in folded if "loader" in f["name"]), folded
    # a failed gate (variant img16-f8, no worker count) is named in both loader figures
    rows = [_data_row("loader", "prepared", "img16-f8", "gate-failed: sample 3 differs")]
    figs = BDA.acceptance(rows, "cpu")[-2:]
    assert all("gate-failed" in f["value"] and not f["passed"] for f in figs), figs


# ---- bench_data: check-second measures the warm manifest also on the run that synthesised -------

def test_data_check_second_trusts_the_manifest_right_after_synthesis(tmp_path, monkeypatch):
    # dtl_fast.data.manifest trusts a sample only when its files are RACY_NS (2 s) older than
    # its check: a check-first just after synthesis must still leave check-second nothing to
    # decode, as the row's extra "manifest": "warm" says
    pytest.importorskip("av")
    import bench_data as BDA
    from dtl_fast.data import folder
    from dtl_fast.data.manifest import RACY_NS

    root, _ = BDA.synthesise(tmp_path / "cache", 40, frames=4, size=16, workers=0, progress=False)
    files = [p for p in root.rglob("*") if p.suffix in (".png", ".mp4")]
    assert files and all(p.stat().st_mtime_ns + RACY_NS < time.time_ns() for p in files)
    decoded = []
    real = folder._run_checks

    def spy(candidates, workers):
        decoded.append(len(candidates))
        return real(candidates, workers)

    monkeypatch.setattr(folder, "_run_checks", spy)
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path / "manifests"))
    BDA.open_splits(root, (16, 4))
    first = sum(decoded)
    decoded.clear()
    BDA.open_splits(root, (16, 4))
    assert first == 40 and sum(decoded) == 0, (first, decoded)


# ---- bench/profile_dtl.py: preset demo is the model `make demo` trains ---------------------------

def test_profile_preset_demo_is_make_demos_model():
    import re
    import shlex

    import profile_dtl as PD
    from dtl_fast.train import TrainConfig

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    m = re.search(r"^DEMO_ARGS\s*\?=\s*((?:.*\\\n)*.*)$", make, re.M)
    assert m, "DEMO_ARGS not found in the Makefile"
    argv = shlex.split(m.group(1).replace("\\\n", " "))
    flags = dict(zip(argv[::2], argv[1::2]))
    d = TrainConfig()

    def get(flag, field):
        return int(flags[flag]) if flag in flags else getattr(d, field)

    pre = PD.PRESETS["demo"]
    assert (pre["B"], pre["T"], pre["S"], pre["C"]) == (
        get("--batch-size", "batch_size"), get("--max-frames", "max_frames"),
        get("--image-size", "image_size"), get("--channels", "channels"))
    for field in ("width", "hidden_size", "dim", "num_heads", "num_layers"):
        assert pre["model"].get(field) == get("--" + field.replace("_", "-"), field), field
    assert "--rnn" not in flags and d.rnn == "lstm"  # profile_dtl's --rnn default
