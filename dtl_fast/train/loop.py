"""The training loop of `dtl-fast train` and the evaluation of a checkpoint.

In one loop over the same batches it trains three models, each with its own Adam: DTL on the
dual task (cross-entropy on its image, video and fused heads), the image-only CNN baseline and
the video-only baseline. After every epoch rank 0 evaluates the five heads on the validation
split, writes the checkpoint and the metrics; at the end it evaluates on the test split, prints
the table and writes results.md and curves.png.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from dtl_fast.train.best import BEST_NAME, BEST_RULE_TEXT, BestTracker, best_state_epochs
from dtl_fast.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    check_out_writable,
    check_resume,
    check_same_samples,
    load_checkpoint,
    normalise_stats,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from dtl_fast.train.config import TrainConfig
from dtl_fast.train.datasets import check_layout, demo_root, make_loaders, open_datasets
from dtl_fast.train.distributed import (
    Dist,
    barrier,
    describe_backend,
    dist_from_env,
    module_backend,
    on_every_rank,
    resolve_device,
)
from dtl_fast.train.graphs import LossSums, StepRunner, set_capturable
from dtl_fast.train.progress import EpochProgress
from dtl_fast.train.reports import (
    HEADS,
    MODEL_NAMES,
    format_best_table,
    format_table,
    format_val_line,
    machine_info,
    write_outputs,
    write_results,
)

# ----------------------------------------------------------------------------------------------
# models


def _build_models(config: TrainConfig, num_classes: int, backend: str) -> dict:
    """The models to train, in a fixed order so that a seed gives the same DTL with or without
    the baselines."""
    from dtl_fast.models import DTL, ImageBaseline, VideoBaseline

    common = dict(in_channels=config.channels, encoder=config.encoder,
                  encoder_weights=config.encoder_weights, width=config.width)
    models = {"dtl": DTL(num_classes, **common, rnn=config.rnn, hidden_size=config.hidden_size,
                         dim=config.dim, num_heads=config.num_heads, num_layers=config.num_layers,
                         backend=backend)}
    if config.baselines:
        models["image_cnn"] = ImageBaseline(num_classes, **common)
        models["video_baseline"] = VideoBaseline(num_classes, **common, backend=backend)
    return models


def _rebuild_model(name: str, cfg: dict):
    from dtl_fast.models import DTL, ImageBaseline, VideoBaseline

    cls = {"dtl": DTL, "image_cnn": ImageBaseline, "video_baseline": VideoBaseline}[name]
    # the state_dict holds the encoder's weights: the file they first came from is not needed
    return cls(**dict(cfg, encoder_weights=None))


def _set_backend(model, backend: str) -> None:
    if hasattr(model, "set_backend"):
        model.set_backend(backend)
    elif hasattr(model, "backend"):
        model.backend = backend


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _accuracies(models: dict, loader, device: torch.device, amp: str | None) -> dict:
    """Accuracy in [0, 1] of each of the five heads (None for a model that was not trained)."""
    correct = {key: 0 for key, _ in HEADS}
    total = 0
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for batch in loader:
            # lengths stay on the CPU: the model checks them on the host, where lengths on the
            # GPU would cost a host sync in every module that takes them
            batch = batch.to(device, non_blocking=True)._replace(lengths=batch.lengths)
            labels = batch.labels
            with _autocast(device, amp):
                out = models["dtl"](batch.images, batch.videos, batch.lengths)
                preds = {"dtl_image": out.image, "dtl_video": out.video, "dtl_fused": out.fused}
                if "image_cnn" in models:
                    preds["image_cnn"] = models["image_cnn"](batch.images)
                if "video_baseline" in models:
                    preds["video_baseline"] = models["video_baseline"](batch.videos, batch.lengths)
            for key, logits in preds.items():
                correct[key] += int((logits.argmax(1) == labels).sum())
            total += int(labels.numel())
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    present = {"dtl_image", "dtl_video", "dtl_fused"} | set(models)
    return {key: (correct[key] / total if key in present and total else None) for key, _ in HEADS}


# ----------------------------------------------------------------------------------------------
# training

def _log(dist_info: Dist, *args) -> None:
    if dist_info.main:
        print(*args, flush=True)


def train(config: TrainConfig) -> dict:
    """Trains DTL (and the baselines) per `config`; returns the metrics dict that is also written
    to OUT/metrics.json. Raises ValueError / BadSampleError naming the flag or file for bad
    input, before any training step. Under torchrun it joins the process group (and leaves it);
    an error in the setup (bad flags, data, checkpoint) is raised on every rank."""
    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    # one form for --mean / --std whether they came from the API (a tuple) or the command line
    # (a list): the checkpoint compares and metrics.json shows what the next run gives
    config.mean, config.std = normalise_stats(config.mean), normalise_stats(config.std)
    dist_info = dist_from_env()
    if dist_info.active and config.batch_size % dist_info.world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be divisible "
                         f"by the {dist_info.world} processes (WORLD_SIZE)")
    device = resolve_device(config.device, dist_info.local_rank)
    if device.type == "cuda":
        # Triton launches on the current device, whatever its tensors' device: cuda:N must be it
        torch.cuda.set_device(device)
    initialised = False
    if dist_info.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised = True
    try:
        return _train(config, dist_info, device, t_start)
    finally:
        if initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _setup(config: TrainConfig, dist_info: Dist):
    """--out made and writable (rank 0), the demo data built (local rank 0); (out, root)."""
    out = Path(config.out)
    if dist_info.main:
        check_out_writable(out)
    if config.data is None:
        from dtl_fast.data import build_demo_dataset

        root = demo_root(config.seed)
        if dist_info.local_rank in (None, 0):  # one builder per machine (the cache is local)
            _log(dist_info, f"data: the bundled digits demo data set in {root}")
            # our own cache folder: an earlier demo build with other parameters (another
            # generator version) is rebuilt; anything that is not a demo build is still refused
            build_demo_dataset(root, seed=config.seed, replace_other_build=True)
    else:
        root = Path(config.data)
    return out, root


def _open_data(config: TrainConfig, dist_info: Dist, root: Path, ckpt_path: Path):
    """(root, {split: dataset}, checkpoint state or None): every split checked, and with
    --resume the checkpoint read and checked against this run's settings and classes."""
    root = root.resolve()  # after every rank knows the demo data is built (it may be a symlink)
    check_layout(root)
    config.data = str(root)
    datasets = open_datasets(root, config, dist_info)
    classes = list(datasets["train"].classes)
    state = None
    if config.resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path} (run without --resume to start)")
        state = load_checkpoint(ckpt_path)
        check_resume(state, config, ckpt_path)
        if list(state["classes"]) != classes:
            raise ValueError(f"--resume: {ckpt_path} has classes {state['classes']}, the data in "
                             f"{root} has {classes}")
        check_same_samples(state, _skipped(datasets), ckpt_path)
    return root, datasets, state


def _skipped(datasets: dict) -> list:
    """The samples the data sets left out as bad: [{"split", "path", "reason"}]."""
    return [{"split": s, "path": str(p), "reason": str(r)}
            for s, ds in datasets.items() for p, r in getattr(ds, "skipped", [])]


def _train(config: TrainConfig, dist_info: Dist, device: torch.device, t_start: float) -> dict:
    # the same on every rank, and before the data is built or checked: a flag that cannot work
    # (--cuda-graphs on a CPU, fused without Triton) fails at once
    backend = module_backend(config.backend, device)
    use_graphs, graphs_reason = graphs_decision(config, device, backend, dist_info)
    # Each step runs on every rank and fails on every rank if it fails on one; its collective
    # also orders the steps: no rank reads the demo data before it is built.
    out, root = on_every_rank(lambda: _setup(config, dist_info), dist_info)
    ckpt_path = out / CHECKPOINT_NAME
    root, datasets, state = on_every_rank(lambda: _open_data(config, dist_info, root, ckpt_path),
                                          dist_info)
    classes = list(datasets["train"].classes)
    if not config.resume and (ckpt_path.is_file() or (out / "metrics.json").is_file()):
        _log(dist_info, f"--out {out} holds an earlier run: replacing it (pass --resume to continue it)")
    skipped = _skipped(datasets)
    if skipped:
        _log(dist_info, f"skipped {len(skipped)} bad sample(s) (--on-bad-sample skip):")
        for item in skipped[:20]:
            _log(dist_info, f"  {item['path']}: {item['reason']}")
        if len(skipped) > 20:
            _log(dist_info, f"  and {len(skipped) - 20} more (all in metrics.json)")

    seed_everything(config.seed)
    models = _build_models(config, len(classes), backend)
    for m in models.values():
        m.to(device)
        if use_graphs and hasattr(m, "static_shapes"):
            # the models' static-shape mode: every frame of the padded clips is encoded (the
            # padded ones masked out) and lengths stay on the device, so no shape depends on
            # the lengths and nothing is read on the host: what a captured graph needs. The
            # eager warm-up and partial-batch steps use it too, so all steps are one function.
            m.static_shapes = True
    # capturable: Adam's step count on the device, so its step can be captured in a graph
    optims = {name: torch.optim.Adam(m.parameters(), lr=config.lr, capturable=use_graphs)
              for name, m in models.items()}

    metrics = {"config": dataclasses.asdict(config), "classes": classes, "epochs": [],
               "skipped": skipped, "world_size": dist_info.world, "total_seconds": 0.0}
    start_epoch, global_step, prior_seconds = 0, 0, 0.0
    if state is not None:
        for name, m in models.items():
            m.load_state_dict(state["models"][name]["state_dict"])
            optims[name].load_state_dict(state["optimizers"][name])
            # the checkpoint's run may have used the other mode (graphs on / off)
            set_capturable(optims[name], use_graphs, device)
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        metrics["epochs"] = list(state["metrics"].get("epochs", []))
        prior_seconds = float(state["metrics"].get("total_seconds", 0.0))
        set_rng_state(state["rng"], device)
    metrics["config"]["epochs"] = config.epochs
    metrics["backend"] = {"requested": config.backend, "modules": backend, "device": str(device),
                          "amp": config.amp}
    metrics["machine"] = machine_info(device)
    # each model's best epoch so far and its weights (resume: from best.pt / the checkpoint),
    # kept by rank 0, the one that writes best.pt
    best = BestTracker(models, out / BEST_NAME) if dist_info.main else None
    if state is not None:
        # rank 0 alone reads best.pt, but a missing or foreign one must stop every rank: one
        # left running would wait in DDP's first collective for a rank 0 that has exited
        on_every_rank(lambda: None if best is None else best.restore(metrics["epochs"], state, ckpt_path),
                      dist_info)

    _log(dist_info, describe_backend(config.backend, backend, device)
         + ("; amp bf16" if config.amp else "") + (f"; {dist_info.world} processes (DDP)" if dist_info.active else ""))
    _log(dist_info, f"data: {root}: {len(classes)} classes, "
         + ", ".join(f"{s} {len(ds)}" for s, ds in datasets.items()) + " samples")

    sampler, train_loader, eval_loaders = make_loaders(config, datasets, dist_info, device)
    train_models = models
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: the batch is already on the device, and DDP with device ids would
        # also move the CPU lengths to the GPU (the model would copy them back: a sync a step)
        ids = None
        if config.encoder == "resnet18" and device.type == "cuda":
            # ResNet-18's BatchNorm would normalise each rank's share alone; SyncBatchNorm
            # (CUDA only) uses the global batch, as one process does. The top module is never
            # a BatchNorm, so the conversion happens in place and `models` sees it.
            for m in models.values():
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        train_models = {name: DDP(m, device_ids=ids) for name, m in models.items()}
    if config.compile:
        # the wrapped modules train; `models` (the originals, sharing the parameters) are saved
        # and evaluated, so checkpoints hold plain state_dicts
        train_models = {name: torch.compile(m) for name, m in train_models.items()}
    runner = StepRunner(train_models, optims, device=device, amp=config.amp,
                        batch_size=config.batch_size // dist_info.world, frames=config.max_frames,
                        capture=use_graphs, fallback=config.cuda_graphs is None)
    _log(dist_info, ("cuda graphs: on (" if use_graphs else "cuda graphs: off (") + graphs_reason + ")"
         + ("; torch.compile: on" if config.compile else ""))

    def session_seconds():
        return prior_seconds + (time.perf_counter() - t_start)

    def record_graphs():
        used = runner.capture and runner.replays > 0
        reason = graphs_reason
        if use_graphs and runner.capture_error:
            reason = f"capture failed, ran eagerly: {runner.capture_error}"
        elif use_graphs and not used:
            reason = (f"no full batch past the {runner.warmup} warm-up steps to capture; ran eagerly")
        metrics["cuda_graphs"] = {"requested": config.cuda_graphs, "used": used, "reason": reason,
                                  "replays": runner.replays}
        metrics["compile"] = bool(config.compile)

    if start_epoch >= config.epochs:
        _log(dist_info, f"--resume: {ckpt_path} already holds all {start_epoch} epoch(s) "
             f"(--epochs {config.epochs}); the run is complete, re-evaluating")
    elif start_epoch:
        _log(dist_info, f"--resume: continuing from {ckpt_path} at epoch {start_epoch + 1}")

    n_train = len(datasets["train"])
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        sums = LossSums(MODEL_NAMES, device)
        # counts the real samples of all ranks (the sampler's padding is left out), on rank 0
        bar = EpochProgress(n_train, f"epoch {epoch + 1}/{config.epochs}", world=dist_info.world,
                            enabled=config.progress and dist_info.main)
        t0 = time.perf_counter()
        for m in models.values():
            m.train()
        for batch in train_loader:
            # lengths stay on the CPU: the model checks them on the host, where lengths on the
            # GPU would cost a host sync in every module that takes them
            batch = batch.to(device, non_blocking=True)._replace(lengths=batch.lengths)
            n = int(batch.labels.numel())
            losses = runner.step(batch)
            sums.add(losses, n)  # on the device: no wait for the GPU here
            global_step += 1
            bar.update(n, loss=losses["dtl"])
        total = sums.tensor()
        if dist_info.active:  # every rank's losses, weighted by its samples
            torch.distributed.all_reduce(total)
        train_loss, count = sums.read(total)  # the epoch's one read of the device
        # under DDP `count` includes the DistributedSampler's padding (samples repeated to even
        # out the ranks' shares); the throughput counts real samples, as the progress bar does
        real = min(count, n_train)
        train_loss = {name: v for name, v in train_loss.items() if name in models}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        bar.close()
        if dist_info.main:
            val = _accuracies(models, eval_loaders["validation"], device, config.amp)
            row = {"epoch": epoch + 1, "global_step": global_step, "train_loss": train_loss,
                   "val_acc": val, "samples_per_s": real / seconds if seconds > 0 else None,
                   "epoch_seconds": seconds}
            metrics["epochs"].append(row)
            metrics["total_seconds"] = session_seconds()
            record_graphs()
            improved = best.update(metrics["epochs"])
            _log(dist_info, format_val_line(epoch + 1, config.epochs, val)
                 + f" | train loss DTL {train_loss['dtl']:.4f} | {row['samples_per_s']:.1f} samples/s"
                 + (f" | new best: {', '.join(improved)}" if improved else ""))
            # a JSON round trip: plain data only, so the checkpoint loads with weights_only=True
            metrics = json.loads(json.dumps(metrics))
            ckpt = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "global_step": global_step,
                "classes": classes, "config": dataclasses.asdict(config),
                "models": {name: {"config": m.config, "state_dict": m.state_dict()}
                           for name, m in models.items()},
                "optimizers": {name: o.state_dict() for name, o in optims.items()},
                "metrics": metrics, "rng": rng_state(device),
            }
            # checkpoint.pt first, then best.pt: a crash between the two leaves a best.pt one
            # improvement behind, which --resume repairs from the checkpoint (BestTracker.restore)
            save_checkpoint(ckpt_path, ckpt)
            if improved:
                best.save(ckpt)
            write_outputs(out, metrics)
        barrier(dist_info)

    if dist_info.main:
        record_graphs()
        if metrics["epochs"]:
            final_val = metrics["epochs"][-1]["val_acc"]
        else:
            final_val = _accuracies(models, eval_loaders["validation"], device, config.amp)
        test = _accuracies(models, eval_loaders["test"], device, config.amp)
        metrics["val_acc"] = final_val
        metrics["test_acc"] = test
        if metrics["epochs"]:
            # the same models at each one's best validation epoch (best.pt), on the test split
            last_states = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                           for name, m in models.items()}
            best.load_into(models)
            metrics["best"] = best.summary(metrics["epochs"])
            metrics["best"]["test_acc"] = _accuracies(models, eval_loaders["test"], device, config.amp)
            for name, m in models.items():
                m.load_state_dict(last_states[name])
        metrics["total_seconds"] = session_seconds()
        metrics["complete"] = True
        table = format_best_table(metrics.get("best"), final_val, test, config.epochs)
        print("\n" + table + "\n", flush=True)
        print(BEST_RULE_TEXT, flush=True)
        g = metrics["cuda_graphs"]
        print(f"run time {metrics['total_seconds']:.1f} s on {metrics['machine']['device_name']} "
              f"({metrics['machine']['device']}); cuda graphs {'on' if g['used'] else 'off'} "
              f"({g['reason']}); outputs in {out}", flush=True)
        header = (f"# dtl-fast train results\n\ndata: {root}; epochs {config.epochs}; batch "
                  f"{config.batch_size}; lr {config.lr}; seed {config.seed}; backend "
                  f"{config.backend} ({backend} ran); device {device}; cuda graphs "
                  f"{'on' if g['used'] else 'off'}; compile {'on' if config.compile else 'off'}; "
                  f"run time {metrics['total_seconds']:.1f} s\n\n")
        write_results(out, header, table + "\n\n" + BEST_RULE_TEXT)
        write_outputs(out, metrics, plot=True)
    if dist_info.active:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def graphs_decision(config: TrainConfig, device: torch.device, backend: str, dist_info: Dist):
    """(use CUDA graphs?, why / why not) for this run. Auto (--cuda-graphs left out): on for the
    fused backend on CUDA in one process without --compile; --cuda-graphs where that does not
    hold is a ValueError naming the flag; --no-cuda-graphs: off."""
    if config.cuda_graphs is False:
        return False, "--no-cuda-graphs"
    blockers = []
    if device.type != "cuda":
        blockers.append(f"the device is {device}: graphs need CUDA")
    elif backend != "fused":
        blockers.append(f"the modules run backend {backend!r} (graphs are used with the fused "
                        "kernels, the path kept free of host syncs)")
    if dist_info.active:
        blockers.append("DDP under torchrun runs eagerly")
    if config.compile:
        blockers.append("--compile (torch.compile'd models run without our graphs)")
    if config.encoder == "resnet18":
        # static shapes encode the padded frames too, and BatchNorm's batch statistics would
        # see them: not the same function as the eager run
        blockers.append("--encoder resnet18 (its BatchNorm would see the padded frames)")
    if blockers:
        if config.cuda_graphs:
            raise ValueError("--cuda-graphs cannot be used here: " + "; ".join(blockers))
        return False, "; ".join(blockers)
    return True, (f"fused backend on {device}: static batch {config.batch_size}, clips padded to "
                  f"--max-frames {config.max_frames}, the last partial batch eager")


# ----------------------------------------------------------------------------------------------
# evaluation of a checkpoint

def evaluate(checkpoint, data, *, device: str = "auto", batch_size: int = 64, workers: int = 0,
             backend: str = "fused", verbose: bool = True, on_bad_sample: str | None = None,
             progress: bool | None = None) -> dict:
    """Evaluates the five heads of a `dtl-fast train` checkpoint (OUT/checkpoint.pt: the last
    epoch; OUT/best.pt: each model at its best validation epoch) on DATA's validation and test
    splits (a raw folder or a prepared data set), with the checkpoint's class list. Returns
    {"val_acc": {...}, "test_acc": {...}, "epoch": int, "epochs": {model: epoch} for best.pt
    else None, "checkpoint": str, "data": str, "table": str, "skipped": [{"split", "path",
    "reason"}]}; prints the table if verbose. on_bad_sample: "error" / "skip", default the
    checkpoint's own (the run's --on-bad-sample); progress: bars while the files are checked
    (default: verbose). The sizes (--image-size ...) are the checkpoint's. Raises
    FileNotFoundError / ValueError naming the checkpoint, the folder or the flag."""
    from torch.utils.data import DataLoader

    from dtl_fast.data import collate_multimodal

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0, got {workers!r}")
    if on_bad_sample not in (None, "error", "skip"):
        raise ValueError(f"--on-bad-sample must be 'error' or 'skip', got {on_bad_sample!r}")
    state = load_checkpoint(checkpoint)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"--data {data}: not a folder")
    check_layout(root, ("validation", "test"))
    dev = resolve_device(device, None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # Triton launches on the current device
    used = module_backend(backend, dev)
    saved = state["config"]
    config = TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    if on_bad_sample is not None:
        config.on_bad_sample = on_bad_sample
    config.workers = workers
    config.progress = verbose if progress is None else bool(progress)
    classes = list(state["classes"])
    _check_prepared_sizes(root, config, checkpoint)
    try:
        datasets = open_datasets(root, config, Dist(), classes=classes, splits=("validation", "test"))
    except ValueError as exc:
        raise ValueError(f"--data {root} does not match checkpoint {checkpoint} (classes "
                         f"{classes}): {exc}") from exc
    models = {}
    for name, entry in state["models"].items():
        m = _rebuild_model(name, dict(entry["config"]))
        m.load_state_dict(entry["state_dict"])
        _set_backend(m, used)
        models[name] = m.to(dev).eval()
    result = {"checkpoint": str(checkpoint), "data": str(root), "epoch": int(state["epoch"]),
              # best.pt: each model's own best epoch (None for checkpoint.pt: all at "epoch")
              "epochs": best_state_epochs(state),
              "skipped": _skipped(datasets)}
    for split, key in (("validation", "val_acc"), ("test", "test_acc")):
        loader = DataLoader(datasets[split], batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate_multimodal)
        result[key] = _accuracies(models, loader, dev, config.amp)
    result["table"] = format_table(result["val_acc"], result["test_acc"])
    if verbose:
        if result["epochs"] is None:
            which = f"epoch {result['epoch']}"
        else:
            which = "best.pt: " + ", ".join(f"{name} at its best epoch {e}"
                                            for name, e in result["epochs"].items())
        print(f"checkpoint {checkpoint} ({which}), data {root}, " + describe_backend(backend, used, dev))
        if result["skipped"]:
            print(f"skipped {len(result['skipped'])} bad sample(s) (--on-bad-sample skip)")
        print(result["table"])
    return result


def _check_prepared_sizes(root: Path, config: TrainConfig, checkpoint) -> None:
    """Raises ValueError when `root` is a prepared data set made with other sample sizes than
    the checkpoint's run used (evaluate takes its sizes from the checkpoint: no flag to pass)."""
    from dtl_fast.data import is_prepared
    from dtl_fast.data.prepared import read_manifest

    if not is_prepared(root):
        return
    m = read_manifest(root)

    def pair(v):
        return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]

    def show(v):
        if isinstance(v, list):
            return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
        return str(v)

    image = pair(config.image_size)
    asked = {"image_size": image,
             "frame_size": image if config.frame_size is None else pair(config.frame_size),
             "max_frames": config.max_frames, "channels": config.channels}
    try:
        differ = [k for k, v in asked.items() if m[k] != v]
    except (KeyError, TypeError):
        return  # a damaged manifest: open_split names what is wrong
    if "frame_size" in differ and config.frame_size is None and m["frame_size"] == m["image_size"]:
        differ.remove("frame_size")  # frames follow the image size on both sides
    if not differ:
        return
    flags = " ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in asked.items()
                     if not (k == "frame_size" and v == image))
    what = ", ".join(f"--{k.replace('_', '-')} {show(m[k])} prepared, {show(asked[k])} in the "
                     "checkpoint" for k in differ)
    raise ValueError(f"--data {root} was prepared with other sizes than checkpoint {checkpoint} "
                     f"was trained with: {what}. evaluate takes the sizes from the checkpoint: "
                     f"evaluate on the raw data ({m.get('source')}) or on a set prepared to match "
                     f"(dtl-fast data prepare {m.get('source')} NEW_OUT {flags})")
