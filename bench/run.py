"""Run every benchmark module that exists, then print a summary with the acceptance figures.

    python bench/run.py --device cpu            # full CPU run
    python bench/run.py --quick                 # cuda if available, else cpu; fewer cases
    python bench/run.py --device cuda --summary-only latest   # recompute the summary from CSVs
    python bench/run.py --device cpu --summary-only 20261129T050909-2494 --only bench_rnn
                                                # a --repeat run by its base id: all its -rN runs

Flags are the same as each bench module's (--quick, --device, --out, --no-plot, --time-budget,
--cold-cache). All modules of one invocation share one run id, stored in every CSV row, so the
summary is computed from exactly this run's rows (also when a module crashed half-way).

Exit status: 0 when every module ran and no gate was red; 1 when a module failed or a
provider's output did not match the reference; with --strict also 2 when an acceptance figure
is FAIL (performance targets are reported, not enforced, by default). 2 also, before anything
runs or is written, for an --only name that is no module (`frame_pool` is short for
`bench_frame_pool`) and for a --summary-only RUN_ID that no row on --device carries. A summary
of no rows at all is printed but never written to a file (it would replace the last real one).

A new kernel adds one line to MODULES; its module provides:
    KERNEL: str                       the CSV name (<out>/<KERNEL>.csv)
    run(args) -> list[row]            measure, append rows, plot
    acceptance(rows, device) -> list[{"name", "value", "passed"}]   (optional)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

MODULES = [
    "bench_frame_pool",  # masked temporal frame pooling (C++ / CUDA)
    "bench_rnn",  # bidirectional LSTM / GRU (Triton)          -- when written
    "bench_cosine_attention",  # feature exchange / DAM attention (Triton) -- when written
    "bench_dtl",  # one DTL training step: fused vs reference vs torch.compile(reference)
    "bench_data",  # data loading: raw files vs `dtl-fast data prepare` (CPU; 10,000 clips, --quick 200)
]


def _rows_of_run(out: Path, kernel: str, run_id: str | None, device: str):
    rows = [r for r in H.read_rows(out / f"{kernel}.csv") if r.get("device") == device]
    if run_id in (None, "latest"):
        ids = sorted({r.get("run_id", "") for r in rows if r.get("run_id")})
        run_id = ids[-1] if ids else None
    return [r for r in rows if r.get("run_id") == run_id], run_id


def _short_names() -> dict[str, str]:
    """--only's accepted spellings: every MODULES name, and its short form without "bench_"."""
    names = {m: m for m in MODULES}
    names.update({m[len("bench_"):]: m for m in MODULES if m.startswith("bench_")})
    return names


def resolve_only(only: list[str] | None) -> list[str]:
    """The MODULES that --only selects, in MODULES order (all of them without --only). Raises
    ValueError naming the unknown names and the valid ones: a typo must not run nothing."""
    if not only:
        return list(MODULES)
    known = _short_names()
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown module(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(MODULES)} (or without the bench_ prefix)")
    wanted = {known[n] for n in only}
    return [m for m in MODULES if m in wanted]


def run_ids_of(out: Path, kernel: str, run_id: str | None, device: str) -> list[str]:
    """The run ids --summary-only RUN_ID stands for in <out>/<kernel>.csv on `device`, oldest
    repeat first: [RUN_ID] when rows carry it; else the repeats of a `--repeat N` run quoted by
    its base id (RUN_ID-r1..RUN_ID-rN, the summary then folds them into medians as the run's own
    summary did); "latest"/None: the newest id (with its fellow repeats if it is one); [] when
    no row matches."""
    ids = {r.get("run_id", "") for r in H.read_rows(out / f"{kernel}.csv")
           if r.get("device") == device and r.get("run_id")}
    if run_id in (None, "latest"):
        if not ids:
            return []
        run_id = max(ids)
        m = re.fullmatch(r"(.+)-r\d+", run_id)
        if m is None:
            return [run_id]
        run_id = m.group(1)
    if run_id in ids:
        return [run_id]
    reps = []
    for i in ids:
        m = re.fullmatch(re.escape(run_id) + r"-r(\d+)", i)
        if m is not None:
            reps.append((int(m.group(1)), i))
    return [i for _, i in sorted(reps)]


def _aten_cpu(rows: list[dict]) -> str:
    """The ATen CPU capability the rows were measured under ("AVX512", "AVX2", ...: the
    `aten_cpu` key of their extra, which CPU rows of bench_frame_pool carry); "" if none says,
    "mixed: ..." if they disagree."""
    seen = []
    for r in rows:
        try:
            cap = json.loads(r.get("extra") or "{}").get("aten_cpu")
        except ValueError:
            continue
        if cap and cap not in seen:
            seen.append(cap)
    return "" if not seen else seen[0] if len(seen) == 1 else "mixed: " + ", ".join(seen)


def _median_over_runs(per_run: list[list[dict]]) -> list[dict]:
    """Acceptance figures of several runs of the same cases, folded into one figure each: the
    median of the measured numbers (a shared machine's load comes and goes between runs)."""
    names = [f["name"] for f in per_run[0]]
    folded = []
    for name in names:
        got = [f for figs in per_run for f in figs if f["name"] == name]
        nums = sorted(f["number"] for f in got if f.get("number") is not None)
        if not nums:
            folded.append(dict(name=name, value=got[0]["value"], passed=False))
            continue
        med = statistics.median(nums)
        unit, target = got[0]["unit"], got[0]["target"]
        spread = ", ".join(f"{n:.2f}" for n in nums)
        # a figure whose grid was cut (cases not run) in any of the runs never passes
        incomplete = [f for f in got if f.get("incomplete")]
        note = f"; incomplete in {len(incomplete)} run(s)" if incomplete else ""
        folded.append(dict(name=name, passed=med >= target and not incomplete,
                           value=f"median {med:.2f}{unit} of {len(nums)} runs: {spread}{note}"))
    return folded


def summarize(mods, out: Path, device: str, run_id, module_status: dict) -> tuple[
        list[str], bool, bool, int]:
    """Returns (lines, red, all_pass, n_rows). run_id: a list of ids (this invocation's runs;
    repeated runs: acceptance figures are the median over them), or one id / "latest" as
    --summary-only takes it (run_ids_of, per module). n_rows: the rows the summary read (the
    last run's, over all modules)."""
    lines = []
    red = False
    all_pass = True
    stamp_line = None
    n_rows = 0
    for name, mod in mods:
        st = module_status.get(name, "")
        kernel = getattr(mod, "KERNEL", None) if mod is not None else None
        if kernel is None:
            lines.append(f"{name:<24} {st}")
            if st.startswith("error"):
                red = True
            continue
        run_ids = run_id if isinstance(run_id, list) else run_ids_of(out, kernel, run_id, device)
        if not run_ids:  # --summary-only: this module was not part of that run
            lines.append(f"{name:<24} rows: none of run {run_id} on {device}")
            continue
        rows, rid = _rows_of_run(out, kernel, run_ids[-1], device)
        n_rows += len(rows)
        if rows and stamp_line is None:
            r0 = rows[0]
            stamp_line = (f"device: {r0['device_name']}  torch {r0['torch']}  triton {r0['triton']}"
                          f"  cuda {r0['cuda']}  git {r0.get('git_rev', '')}  run {rid}")
            aten = _aten_cpu(rows)
            if aten:  # the eager side's CPU kernels (ATEN_CPU_CAPABILITY may lower them)
                stamp_line += f"  ATen CPU {aten}"
        c = Counter(r["status"].split(":")[0] for r in rows)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no rows"
        lines.append(f"{name:<24} {st + '; ' if st else ''}rows: {counts}")
        if st.startswith("error") or c.get("error"):
            red = True
        for r in rows:
            if r["status"].startswith(("gate-failed", "error")):
                # a comparison provider (torch.segment_reduce, SDPA, cuDNN, torch.compile, ...)
                # missing its gate is reported, not counted against dtl_fast's run
                own = r["provider"].startswith(("dtl_fast", "fused", "reference"))
                red = red or own or r["status"].startswith("error")
                tag = "RED " if own else "note"
                lines.append(f"    {tag} {r['provider']} {r['mode']} {r['variant']} {r['shape']} "
                             f"{r['dtype']}: {r['status'][:110]}")
        acc = getattr(mod, "acceptance", None)
        if acc is not None and st != "skipped":
            figs = acc(rows, device)
            if len(run_ids) > 1 and figs:
                figs = _median_over_runs(
                    [acc(_rows_of_run(out, kernel, r, device)[0], device) for r in run_ids])
            if figs:
                n_pass = sum(f["passed"] for f in figs)
                lines.append(f"  acceptance {kernel} ({device}): {n_pass}/{len(figs)} PASS")
                for f in figs:
                    lines.append(f"    {'PASS' if f['passed'] else 'FAIL'}  {f['name']}  "
                                 f"({f['value']})")
                all_pass &= n_pass == len(figs)
    if stamp_line:
        lines.insert(0, stamp_line)
    return lines, red, all_pass, n_rows


_MODULE_CACHE: dict[str, object] = {}


def _run_modules(args, names, mods, status: dict, t_start: float) -> None:
    """Runs every bench module in `names` once, under args.run_id, recording how each went in
    `status`. The first round (mods is a list) imports them and appends (name, module) to mods."""
    for name in names:
        if mods is not None:
            if not (H.BENCH_DIR / f"{name}.py").exists():
                status[name] = "not written yet"
                mods.append((name, None))
                continue
            try:
                _MODULE_CACHE[name] = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001
                status[name] = f"error: import failed: {type(exc).__name__}: {exc}"
                mods.append((name, None))
                continue
            mods.append((name, _MODULE_CACHE[name]))
        mod = _MODULE_CACHE.get(name)
        if mod is None or args.summary_only is not None:
            continue
        if args.time_budget is not None:
            left = args.time_budget - (time.monotonic() - t_start)
            if left <= 0:
                status[name] = "skipped"
                print(f"[run] time budget spent: {name} skipped")
                continue
        print(f"\n===== {name} ({args.run_id}) =====", flush=True)
        t0 = time.monotonic()
        margs = argparse.Namespace(**vars(args))
        if args.time_budget is not None:
            margs.time_budget = args.time_budget - (time.monotonic() - t_start)
        try:
            mod.run(margs)
            status[name] = f"ran in {time.monotonic() - t0:.0f} s"
        except SystemExit as exc:  # e.g. dtl_fast not importable
            status[name] = f"error: {exc}".splitlines()[0]
            print(f"[run] {name}: {exc}")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            status[name] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:160]


def main(argv=None) -> int:
    p = H.add_common_args(argparse.ArgumentParser(description="run all dtl_fast benchmarks"))
    p.add_argument("--only", action="append", default=None, metavar="MODULE",
                   help="run only this module (repeatable), e.g. bench_frame_pool or frame_pool")
    p.add_argument("--summary-only", nargs="?", const="latest", default=None, metavar="RUN_ID",
                   help="measure nothing; summarize RUN_ID (default: the latest run on --device); "
                        "the base id of a --repeat run summarizes its repeats RUN_ID-r1..rN")
    p.add_argument("--strict", action="store_true", help="exit 2 when an acceptance figure FAILs")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run everything N times (run ids <id>-r1..rN); acceptance figures are "
                        "the median over the N runs (for a shared, noisy machine)")
    p.add_argument("--summary-file", default=None,
                   help="also write the summary here (default <out>/summary_<device-slug>.txt); "
                        "with --summary-only and this flag, CUDA is never initialised")
    p.add_argument("--no-summary-file", action="store_true",
                   help="print the summary but write no file (gpu_check.sh writes one combined "
                        "summary at the end)")
    args = p.parse_args(argv)
    try:  # before anything runs or is written: a typo must not run nothing and say so quietly
        names = resolve_only(args.only)
    except ValueError as exc:
        p.error(f"argument --only: {exc}")
    if args.repeat < 1:
        p.error(f"argument --repeat: must be >= 1, got {args.repeat}")
    out = Path(args.out)
    if args.summary_only is not None:
        # reads CSVs only: --device given means no CUDA call at all (gpu_check.sh's summary)
        device = args.device or ("cuda" if H.torch.cuda.is_available() else "cpu")
    else:
        device = H.resolve_device(args.device)
        args.device = device
    args.run_id = args.run_id or H.new_run_id()
    H.apply_threads(args)  # before any module runs, so the summary's device slug matches
    if args.summary_only is None:
        out.mkdir(parents=True, exist_ok=True)

    mods: list[tuple[str, object]] = []
    status: dict[str, str] = {}
    t_start = time.monotonic()
    repeat = args.repeat if args.summary_only is None else 1
    base_id = args.run_id
    run_ids = [base_id] if repeat == 1 else [f"{base_id}-r{i + 1}" for i in range(repeat)]
    for rep, rid in enumerate(run_ids):
        args.run_id = rid
        _run_modules(args, names, mods if rep == 0 else None, status, t_start)

    if args.summary_only is not None:
        kernels = [m.KERNEL for _, m in mods if getattr(m, "KERNEL", None)]
        if not any(run_ids_of(out, k, args.summary_only, device) for k in kernels):
            which = ("any run" if args.summary_only == "latest"
                     else f"run {args.summary_only!r} (nor its repeats {args.summary_only}-rN)")
            p.error(f"argument --summary-only: no rows of {which} on device {device} in "
                    f"{', '.join(str(out / f'{k}.csv') for k in kernels) or '(no module)'}; "
                    f"nothing summarized, nothing written")

    run_id = args.summary_only if args.summary_only is not None else run_ids
    lines, red, all_pass, n_rows = summarize(mods, out, device, run_id, status)
    text = "\n".join(["", "=" * 30 + f" benchmark summary ({device}) " + "=" * 30, *lines, ""])
    print(text)
    summary_path = None
    if args.summary_file:  # no device query on this path (no CUDA initialisation)
        summary_path = Path(args.summary_file)
    elif not args.no_summary_file:
        slug = (H.device_slug(device) if (device == "cpu" or H.torch.cuda.is_available())
                else device)
        summary_path = out / f"summary_{slug}.txt"
    if summary_path is not None and n_rows == 0:
        # an empty summary would replace the last real one (e.g. the committed summary file)
        print(f"[run] no rows to summarize: {summary_path} not written")
    elif summary_path is not None:
        try:
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(text.lstrip("\n") + "\n")
        except OSError as exc:
            print(f"[run] could not write {summary_path}: {exc}")
    if red:
        return 1
    if args.strict and not all_pass:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
