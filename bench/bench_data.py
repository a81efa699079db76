"""Data loading benchmark: raw image + video files against a prepared (`dtl-fast data prepare`)
data set.

Synthesises a data set of N short H.264 clips (default 10,000; 16 frames of 64 x 64 RGB, an
.mp4 each, PyAV with libx264; mpeg4 when no H.264 encoder is there, and the rows say so) with a
64 x 64 PNG image each, split 80 / 10 / 10 % into train / validation / test over 10 classes,
once into a cache folder reused by later runs. Then measures:

- ``check-first``: building the three MultiModalFolder splits (the check that decodes every
  file) with an empty check-manifest cache (DTL_FAST_CACHE points at a fresh temporary folder);
- ``check-second``: the same again, manifest warm: what a second `dtl-fast train` on the
  unchanged data waits before its first step (ratio: first / second). The synthesised files'
  mtimes are set 10 s back, past the manifest's 2 s racy-clean window (RACY_NS), so that this
  holds on the run that synthesised them too (else every clip is decoded again);
- ``prepare``: `dtl-fast data prepare` of all splits (its check runs with the manifest warm);
- ``open``: opening the three prepared splits (`open_split`, integrity check included);
- ``loader``: DataLoader throughput, samples/s, on the train split, batch 64,
  collate_multimodal, random order, with 0 / 2 / 4 worker processes, from the raw files and
  from the prepared split (ratio: prepared / raw at the same worker count). Timed after the
  first batch of every worker (start-up, reported as ``startup_s``) for at least
  ``--loader-seconds`` and 10 batches, across epochs (persistent workers). With 0 workers the
  rows also give ``samples_per_cpu_s`` (samples per second of this process's CPU time: less
  sensitive to other processes on a shared machine than wall-clock samples/s).

Training sizes (``--sizes``): ``16x8`` is the demo's (Makefile DEMO_ARGS: --image-size 16
--max-frames 8), ``64x16`` the clips' own (no resize, every frame). Before the loaders are
timed, samples of the prepared split are compared bitwise with the raw ones (a gate: a failed
comparison is a ``gate-failed`` row and nothing is timed).

Rows go to ``<out>/data.csv`` (bench/results by default) with the harness's columns; one-shot
times are in ``median_ms`` (p20 = p80 = median), loader rows hold the median time between
batches and ``extra.samples_per_s``; the machine's load average is in every row (on a shared
CPU the numbers move with it).

    python bench/bench_data.py                 # 10,000 clips, sizes 16x8 and 64x16
    python bench/bench_data.py --quick         # 200 clips, 16x8 only (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

KERNEL = "data"
SPLIT_FRACTIONS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
NUM_CLASSES = 10
SYNTH_VERSION = 1
CODECS = ("libx264", "libopenh264", "h264", "mpeg4")  # first that encodes here wins
BATCH = 64
TARGET_SECOND_START_S = 5.0
TARGET_RATIO = 10.0
TARGET_SPS_2W = 5000.0


# ----------------------------------------------------------------------------------------------
# synthesis


def pick_codec() -> str:
    """The first encoder of CODECS that PyAV has."""
    import av

    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 -- not built into this FFmpeg
            continue
    raise RuntimeError(f"PyAV has none of the encoders {CODECS}")


def _noise_bank(size: int) -> np.ndarray:
    # a few fixed noise fields shared by every clip: drawing fresh noise per frame cost more
    # than encoding it
    return np.random.default_rng(1234).normal(0, 4, (32, size, size, 3)).astype(np.float32)


def clip_pixels(i: int, frames: int, size: int, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [S, S, 3], clip uint8 [T, S, S, 3]) of sample i: a class-coloured square
    moving over a class-tinted gradient, with noise; distinct for every i."""
    rng = np.random.default_rng(i)
    label = i % NUM_CLASSES
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([40 + 12 * label + xx, 60 + yy, 200 - 10 * label + 0 * xx], -1)
    colour = np.array([(37 * label) % 256, (91 * label + 50) % 256, (53 * label + 100) % 256], np.float32)
    side = size // 4
    y0, x0 = rng.integers(0, size - side, 2)
    dy, dx = rng.integers(-2, 3, 2)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        f = base + bank[(i + 7 * t) % len(bank)]
        cy, cx = int(np.clip(y0 + dy * t, 0, size - side)), int(np.clip(x0 + dx * t, 0, size - side))
        f[cy:cy + side, cx:cx + side] = colour
        clip[t] = np.clip(f, 0, 255)
    image = np.clip(base + bank[i % len(bank)] * 2, 0, 255).astype(np.uint8)
    image[y0:y0 + side, x0:x0 + side] = colour.astype(np.uint8)
    return image, clip


def _encode(path: str, clip: np.ndarray, codec: str) -> None:
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast"}
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _synth_chunk(task) -> int:
    from PIL import Image

    root, items, frames, size, codec = task
    bank = _noise_bank(size)
    for i, split in items:
        folder = os.path.join(root, split, f"c{i % NUM_CLASSES}")
        image, clip = clip_pixels(i, frames, size, bank)
        Image.fromarray(image).save(os.path.join(folder, f"s{i:05d}.png"), compress_level=1)
        _encode(os.path.join(folder, f"s{i:05d}.mp4"), clip, codec)
    return len(items)


def split_of(i: int, clips: int) -> str:
    """Split of sample i: the first 80 % train, then 10 % validation, 10 % test."""
    edge = 0.0
    for split, frac in SPLIT_FRACTIONS:
        edge += frac
        if i < round(edge * clips):
            return split
    return SPLIT_FRACTIONS[-1][0]


def _age_past_racy_window(folder: Path) -> None:
    """Sets the mtime of every file under `folder` 5 x RACY_NS (10 s) back. The check manifest
    trusts a sample only when its files are older than its check by RACY_NS (2 s, git's "racy
    clean" rule, dtl_fast.data.manifest): without this, a check-first right after synthesis
    records every clip as too fresh and check-second decodes them all again (measured: 1.19 s
    against 1.34 s, 1.13x, where the warm manifest gives ~63x). Data a user trains on is older
    than 2 s; this makes the first run measure that case, as every later run does."""
    from dtl_fast.data.manifest import RACY_NS

    old = time.time_ns() - 5 * RACY_NS
    for dirpath, _, files in os.walk(folder):
        for name in files:
            os.utime(os.path.join(dirpath, name), ns=(old, old))


def synthesise(cache: Path, clips: int, frames: int = 16, size: int = 64, workers: int = 2,
               progress: bool = True) -> tuple[Path, dict]:
    """The synthetic data set under `cache` (built once; later calls return it at once).
    Returns (root, its marker dict: clips, frames, size, codec, seconds)."""
    codec = pick_codec()
    root = cache / f"clips{clips}-f{frames}-s{size}-{codec}-v{SYNTH_VERSION}"
    marker = root / "bench_data.json"
    if marker.is_file():
        return root, json.loads(marker.read_text())
    from dtl_fast._progress import progress_bar

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    try:
        for split, _ in SPLIT_FRACTIONS:
            for c in range(NUM_CLASSES):
                (tmp / split / f"c{c}").mkdir(parents=True)
        items = [(i, split_of(i, clips)) for i in range(clips)]
        tasks = [(str(tmp), items[s:s + 50], frames, size, codec) for s in range(0, clips, 50)]
        with progress_bar(clips, "synthesise clips", unit=" clips", enabled=progress) as bar:
            if workers > 0:
                with ProcessPoolExecutor(workers) as pool:
                    for n in pool.map(_synth_chunk, tasks):
                        bar.update(n)
            else:
                for n in map(_synth_chunk, tasks):
                    bar.update(n)
        _age_past_racy_window(tmp)
        info = dict(clips=clips, frames=frames, size=size, codec=codec,
                    seconds=round(time.perf_counter() - t0, 1), version=SYNTH_VERSION)
        (tmp / "bench_data.json").write_text(json.dumps(info))  # last: the set is complete
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, info


# ----------------------------------------------------------------------------------------------
# measurements


def open_splits(root, sizes: tuple[int, int], check_workers: int = 0) -> dict:
    """The three splits through open_split (raw: the MultiModalFolder check), train's classes
    for the others, as `dtl-fast train` opens them."""
    from dtl_fast.data import open_split

    image, max_frames = sizes
    out, classes = {}, None
    for split, _ in SPLIT_FRACTIONS:
        out[split] = open_split(root, split, image_size=image, max_frames=max_frames, classes=classes,
                                workers=check_workers, progress=False)
        classes = list(out[split].classes)
    return out


def loader_throughput(ds, workers: int, seconds: float, batch: int = BATCH, seed: int = 0,
                      min_batches: int = 10) -> dict:
    """Samples/s of a training-like DataLoader over `ds` (batch 64 by default, random order,
    collate_multimodal), timed after the first batch of each worker for >= `seconds` and
    >= min_batches batches, across epochs (persistent workers)."""
    from torch.utils.data import DataLoader, RandomSampler

    from dtl_fast.data import collate_multimodal

    import warnings

    # 4 workers on a 2-core machine is a measured case here, not a mistake to warn about
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=g),
                        num_workers=workers, collate_fn=collate_multimodal, drop_last=True,
                        persistent_workers=workers > 0)
    if len(loader) == 0:
        raise ValueError(f"the split has {len(ds)} samples, fewer than one batch of {batch}")
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(min(max(1, workers), len(loader))):  # each worker's first batch: start-up
        next(it)
    startup = time.perf_counter() - t0
    intervals, samples = [], 0
    cpu0 = time.process_time()  # this process's CPU time: all of the work when workers == 0
    start = last = time.perf_counter()
    while True:
        for got in it:
            now = time.perf_counter()
            intervals.append(now - last)
            last = now
            samples += int(got.labels.shape[0])
            if now - start >= seconds and len(intervals) >= min_batches:
                break
        else:
            it = iter(loader)  # next epoch (same workers)
            continue
        break
    cpu = time.process_time() - cpu0
    del it, loader
    elapsed = last - start
    ms = sorted(x * 1e3 for x in intervals)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return dict(samples_per_s=samples / elapsed, samples=samples, batches=len(intervals),
                samples_per_cpu_s=samples / cpu if workers == 0 and cpu > 0 else None,
                seconds=elapsed, startup_s=startup, timing=(statistics.median(ms), q[1], q[7]))


def items_equal(raw, prepared, indices) -> tuple[bool, str]:
    """The gate: the prepared split's samples are bitwise the raw ones at `indices`."""
    if raw.samples != prepared.samples:
        return False, "sample lists differ"
    for i in indices:
        a, b = raw[i], prepared[i]
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]):
            return False, f"sample {i} differs"
    batch = prepared.__getitems__(list(indices))
    for i, b in zip(indices, batch):
        a = raw[i]
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]):
            return False, f"sample {i} differs when fetched as a batch"
    return True, f"{len(indices)} samples bitwise equal"


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    s = time.perf_counter() - t0
    return value, (s * 1e3, s * 1e3, s * 1e3)


# ----------------------------------------------------------------------------------------------
# run


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, _, b = part.strip().partition("x")
        if not (a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0):
            raise SystemExit(f"--sizes: expected IMAGExFRAMES pairs such as 16x8,64x16, got {part!r}")
        out.append((int(a), int(b)))
    return out


def _settings(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    clips = getattr(args, "clips", None) or (200 if quick else 10_000)
    sizes = getattr(args, "sizes", None) or ("16x8" if quick else "16x8,64x16")
    workers = getattr(args, "loader_workers", None) or ("0,2" if quick else "0,2,4")
    cache = getattr(args, "cache", None) or os.path.join(
        os.environ.get("DTL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dtl_fast"),
        "bench-data")
    return dict(
        clips=int(clips), sizes=_parse_sizes(sizes), cache=Path(cache),
        loader_workers=[int(w) for w in str(workers).split(",")],
        loader_seconds=getattr(args, "loader_seconds", None) or (1.0 if quick else 8.0),
        prepare_workers=getattr(args, "prepare_workers", None) or 2,
        check_workers=getattr(args, "check_workers", 0) or 0,
        batch=getattr(args, "batch", None) or BATCH,
        progress=not getattr(args, "no_progress", False),
    )


def run(args) -> list[dict]:
    """Measures everything (module docstring) and appends the rows to <out>/data.csv."""
    from dtl_fast.data.prepared import prepare

    kernel, run_id, deadline = H.start_run(args, KERNEL)
    st = _settings(args)
    stamp, writer = H.open_results(args, kernel, "cpu")  # data loading runs on the CPU
    rows: list[dict] = []
    emit = H.emitter(writer, rows, ("seconds", "samples_per_s", "x_raw"))
    if deadline.expired():  # --time-budget 0: nothing is synthesised or measured, rows say so
        for mode in ("check-first", "check-second", "prepare", "open", "loader"):
            r = H.make_row(kernel=kernel, provider="(all)", mode=mode, variant="", shape=f"{st['clips']}",
                           dtype="", stamp=stamp, timing=None, baseline="", baseline_ms=None,
                           status=H.BUDGET_SPENT, run_id=run_id)
            emit(r)
        return rows
    root, info = synthesise(st["cache"], st["clips"], progress=st["progress"])
    codec = info["codec"]
    dtype = "h264" if codec in ("libx264", "libopenh264", "h264") else codec
    shape = f"{info['clips']}x{info['frames']}x{info['size']}x{info['size']}"
    note = "" if dtype == "h264" else f"no H.264 encoder in this PyAV: clips are {codec}"
    base_extra = {"codec": codec, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if note:
        base_extra["note"] = note
    print(f"[{kernel}] data set: {root} ({shape}, {codec}, synthesised in {info['seconds']} s once)")

    def row(provider, mode, variant, timing, baseline, baseline_ms, extra=None, status="ok",
            ratio=None):
        ex = dict(base_extra, loadavg=H._loadavg(), **(extra or {}))
        r = H.make_row(kernel=kernel, provider=provider, mode=mode, variant=variant, shape=shape,
                       dtype=dtype, stamp=stamp, timing=timing, baseline=baseline,
                       baseline_ms=baseline_ms, extra=ex, status=status, run_id=run_id)
        if ratio is not None:  # loader rows: the throughput ratio, not one of median intervals
            r["ratio"] = H._fmt(ratio, 4)
        emit(r)
        return r

    old_cache = os.environ.get("DTL_FAST_CACHE")
    manifests = tempfile.mkdtemp(prefix="dtl-bench-manifest-")
    os.environ["DTL_FAST_CACHE"] = manifests  # a fresh check-manifest cache for check-first
    try:
        check_size = st["sizes"][0]
        _, first = _timed(lambda: open_splits(root, check_size, st["check_workers"]))
        row("raw", "check-first", f"check-workers={st['check_workers']}", first, "check-first", first[0],
            {"seconds": round(first[0] / 1e3, 2), "manifest": "empty"})
        _, second = _timed(lambda: open_splits(root, check_size, st["check_workers"]))
        row("raw", "check-second", f"check-workers={st['check_workers']}", second, "check-first", first[0],
            {"seconds": round(second[0] / 1e3, 3), "manifest": "warm"})

        for image, frames in st["sizes"]:
            variant = f"img{image}-f{frames}"
            if deadline.expired():
                row("(all)", "prepare", variant, None, "", None, status=H.BUDGET_SPENT)
                row("(all)", "loader", variant, None, "raw", None, status=H.BUDGET_SPENT)
                continue
            out = st["cache"] / f"prepared-{root.name}-{variant}"
            _, t_prep = _timed(lambda: prepare(root, out, image_size=image, max_frames=frames,
                                               workers=st["prepare_workers"], overwrite=True,
                                               progress=st["progress"]))
            size = sum(p.stat().st_size for p in out.rglob("*.npy"))
            row("prepared", "prepare", variant, t_prep, "prepare", t_prep[0],
                {"seconds": round(t_prep[0] / 1e3, 1), "workers": st["prepare_workers"],
                 "mib": round(size / 2**20, 1), "check": "manifest warm"})
            prepared, t_open = _timed(lambda: open_splits(out, (image, frames)))
            row("prepared", "open", variant, t_open, "check-second", second[0],
                {"seconds": round(t_open[0] / 1e3, 3)})
            raw = open_splits(root, (image, frames))  # manifest warm: fast
            n = len(raw["train"])
            probe = sorted({0, n - 1, *np.random.default_rng(0).integers(0, n, 14).tolist()})
            ok, msg = items_equal(raw["train"], prepared["train"], probe)
            if not ok:
                row("prepared", "loader", variant, None, "raw", None, status=f"gate-failed: {msg}")
                continue
            for w in st["loader_workers"]:
                if deadline.expired():
                    row("(all)", "loader", f"{variant}-w{w}", None, "raw", None, status=H.BUDGET_SPENT)
                    continue
                res = {}
                for provider, ds in (("raw", raw["train"]), ("prepared", prepared["train"])):
                    try:
                        res[provider] = loader_throughput(ds, w, st["loader_seconds"], st["batch"])
                    except Exception as exc:  # noqa: BLE001 -- one broken case must not end the run
                        res[provider] = None
                        row(provider, "loader", f"{variant}-w{w}", None, "raw", None,
                            status=H.exc_status(exc, "cpu"))
                base_sps = res["raw"]["samples_per_s"] if res.get("raw") else None
                for provider, r in res.items():
                    if r is None:
                        continue
                    extra = {"samples_per_s": round(r["samples_per_s"], 1), "batches": r["batches"],
                             "samples": r["samples"], "startup_s": round(r["startup_s"], 2),
                             "workers": w, "batch": st["batch"], "gate": msg if provider == "prepared" else ""}
                    if r["samples_per_cpu_s"]:
                        # robust to a shared machine's load: what one busy core would deliver
                        extra["samples_per_cpu_s"] = round(r["samples_per_cpu_s"], 1)
                    x = r["samples_per_s"] / base_sps if base_sps else None
                    if x is not None:
                        extra["x_raw"] = round(x, 2)
                    row(provider, "loader", f"{variant}-w{w}", r["timing"], "raw", None, extra, ratio=x)
    finally:
        if old_cache is None:
            os.environ.pop("DTL_FAST_CACHE", None)
        else:
            os.environ["DTL_FAST_CACHE"] = old_cache
        shutil.rmtree(manifests, ignore_errors=True)
    print(f"\n[{kernel}] results (cpu, run {run_id}) -> {writer.path}")
    H.print_table(rows, extra_keys=("seconds", "samples_per_s", "x_raw"))
    return rows


def acceptance(rows, device) -> list[dict]:
    """The issue's figures: second start under 5 s; at the demo's sizes (16x8) the prepared
    loader >= 10x raw at every worker count and > 5,000 samples/s with 2 workers. Each as a number that
    passes at >= target (run.py folds repeated runs by the median). Data loading runs on the
    CPU: its rows say device "cpu", and a summary for another device gets no figures."""
    if device != "cpu":
        return []
    figs = []
    name = "second start (raw check, manifest warm) < 5 s"
    second = [r for r in rows if r["mode"] == "check-second"]
    if second:
        r = second[-1]
        s = H.fnum(r["median_ms"])
        if r["provider"] == "(all)":  # cut by the time budget: says so, like every module
            figs.append(H.mark_not_run(dict(name=name, value="cut", passed=False), 1))
        elif s is None or not H.row_ok(r):
            figs.append(dict(name=name, passed=False, value=r["status"]))
        else:
            s /= 1e3
            figs.append(dict(name=name, passed=s < 5.0,
                             number=TARGET_SECOND_START_S / s, target=1.0, unit="x",
                             value=f"{s:.2f} s on {r['shape']} ({TARGET_SECOND_START_S / s:.1f}x under 5 s)"))
    # the demo's sizes (64x16 is reported, not judged); a case that did not run (its "(all)"
    # row: the whole size, one worker count, or everything under --time-budget 0) fails the
    # figure and says "N case(s) not run" (H.mark_not_run: also when run.py folds repeats)
    cut = [r for r in rows if r["mode"] == "loader" and r["provider"] == "(all)"
           and (r["variant"] in ("", "img16-f8") or r["variant"].startswith("img16-f8-"))]
    cut_w2 = [r for r in cut if r["variant"] in ("", "img16-f8", "img16-f8-w2")]
    # the prepared rows, and a failed gate (variant img16-f8) or a raw loader that failed
    loaders = [r for r in rows if r["mode"] == "loader"
               and (r["variant"] == "img16-f8" or r["variant"].startswith("img16-f8-"))
               and (r["provider"] == "prepared" or (r["provider"] == "raw" and not H.row_ok(r)))]

    def figure(name, measured, cut_rows, value_fn, target, unit="x"):
        f = (H.min_figure(name, measured, value_fn, target, unit) if measured or not cut_rows
             else dict(name=name, value="cut", passed=False))
        return H.mark_not_run(f, len(cut_rows))

    figs.append(figure("prepared loader >= 10x raw, same workers, demo sizes 16x8", loaders, cut,
                       lambda r: H.fnum(r["ratio"]), TARGET_RATIO))
    two = [r for r in loaders if r["variant"] in ("img16-f8", "img16-f8-w2")]
    figs.append(figure("prepared loader > 5,000 samples/s, 2 workers, demo sizes 16x8", two,
                       cut_w2, lambda r: H.row_extra(r).get("samples_per_s"), TARGET_SPS_2W,
                       unit=" samples/s"))
    return figs


def main(argv=None) -> int:
    p = H.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--clips", type=int, default=None, help="clips to synthesise (default 10000; "
                   "--quick 200)")
    p.add_argument("--sizes", default=None, metavar="IxF,...",
                   help="training sizes, image size x max frames (default 16x8,64x16; --quick 16x8)")
    p.add_argument("--loader-workers", default=None, metavar="N,...",
                   help="DataLoader worker counts (default 0,2,4; --quick 0,2)")
    p.add_argument("--loader-seconds", type=float, default=None,
                   help="minimum timed seconds per loader measurement (default 8; --quick 1)")
    p.add_argument("--prepare-workers", type=int, default=None, help="data prepare --workers (default 2)")
    p.add_argument("--check-workers", type=int, default=0,
                   help="MultiModalFolder check workers (default 0: threads, as dtl-fast train)")
    p.add_argument("--batch", type=int, default=None, help=f"loader batch size (default {BATCH})")
    p.add_argument("--cache", default=None, help="where the synthetic data set is built once "
                   "(default $DTL_FAST_CACHE/bench-data or ~/.cache/dtl_fast/bench-data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    rows = run(args)
    for f in acceptance(rows, "cpu"):
        print(f"  {'PASS' if f['passed'] else 'FAIL'}  {f['name']}  ({f['value']})")
    return 1 if any(r["status"].startswith(("gate-failed", "error")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
