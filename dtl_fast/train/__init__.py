"""`dtl-fast train`: DTL and its two single-modality baselines on a multimodal image + video folder.

    dtl-fast train --data DIR                 # or no --data: the bundled digits demo data
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

Writes under --out: checkpoint.pt (every epoch, atomically), metrics.json, metrics.csv,
results.md (the table) and curves.png (if matplotlib is installed).

The modules, each one job (the package uses dtl_fast.models and dtl_fast.data, never the reverse):

    config.py       TrainConfig and the command-line flags
    entry.py        run_config, main: the command line's entry (exit status 2 on bad input)
    loop.py         train (the loop) and evaluate (a checkpoint's table)
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

__all__ = ["TrainConfig", "train", "evaluate", "build_parser", "main", "add_train_arguments",
           "config_from_args", "run_config", "save_checkpoint", "load_checkpoint", "format_table",
           "HEADS", "MODEL_NAMES", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME"]
