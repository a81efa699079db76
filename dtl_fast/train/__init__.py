"""`dtl-fast train`: DTL and its two single-modality baselines on a multimodal image + video folder.

    dtl-fast train --data DIR                 # or no --data: the bundled digits demo data
    dtl-fast train --data DIR --seeds 0,1,2   # one run per seed, mean +- std, paired interval
    torchrun --nproc_per_node=N -m dtl_fast.train --data DIR      # DistributedDataParallel

The defaults are the original training script's: 20 epochs, batch size 64, Adam with learning
rate 1e-3, cross-entropy. In one loop over the same batches it trains three models, each with
its own Adam: the image-only CNN baseline (the classic supervised method), the video-only
baseline, and DTL on the dual task (cross-entropy on its image, video and fused heads).

Under torchrun (WORLD_SIZE > 1) each of the N ranks takes batch_size / N samples of every
global batch (a DistributedSampler, as in one process, where it has num_replicas=1), so one
process and N processes see the same global batches. DDP averages the gradients over ranks;
with equal per-rank batch sizes that average is one process's mean over the global batch. The
last batch of an epoch can be partial and then the ranks' shares differ, so that one step is
not exactly the one-process step; a dataset size divisible by the global batch avoids it.
Only rank 0 prints (the progress bar counts the real samples of all ranks), evaluates and
writes files; an error in the setup stops every rank and rank 0 prints it.

Writes under --out: checkpoint.pt (every epoch, atomically), best.pt (each model at its best
validation epoch), metrics.json, metrics.csv, results.md (the table: each head at its best
epoch and at the last) and curves.png (if matplotlib is installed). With --seeds: one such
folder per seed, OUT/seed-<s>/, and OUT/seeds.json / seeds.md (dtl_fast.train.seeds).

On CUDA with the fused backend each model's training step is captured in a CUDA graph and
replayed (--no-cuda-graphs: eager); --compile wraps the models in torch.compile. Losses are
summed on the device and read once per epoch.

The modules, each one job (the package uses dtl_fast.models and dtl_fast.data, never the reverse):

    config.py       TrainConfig and the command-line flags
    entry.py        run_config, main: the command line's entry (exit status 2 on bad input)
    loop.py         train (the loop) and evaluate (a checkpoint's table)
    graphs.py       the training step: eager, on static buffers, or replayed from a CUDA graph
    best.py         each model's best validation epoch and best.pt
    seeds.py        --seeds: one run per seed and the summary over seeds
    stats.py        mean, sample std, Student t quantiles and intervals (no scipy)
    datasets.py     the splits (dtl_fast.data.open_split) and their loaders
    distributed.py  device, backend, torchrun ranks; setup errors raised on every rank
    checkpoints.py  atomic writes, the checkpoint format, resume checks, RNG state
    reports.py      the table, metrics.json / .csv, results.md, curves.png
    progress.py     the epoch progress bar (tqdm, through dtl_fast._progress)
"""
from dtl_fast.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from dtl_fast.train.config import TrainConfig, add_train_arguments, build_parser, config_from_args
from dtl_fast.train.entry import main, run_config
from dtl_fast.train.loop import evaluate, train
from dtl_fast.train.reports import HEADS, MODEL_NAMES, format_table
from dtl_fast.train.seeds import train_seeds

__all__ = ["TrainConfig", "train", "train_seeds", "evaluate", "build_parser", "main", "add_train_arguments",
           "config_from_args", "run_config", "save_checkpoint", "load_checkpoint", "format_table",
           "HEADS", "MODEL_NAMES", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME"]
