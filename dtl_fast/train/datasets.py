"""The data `dtl-fast train` reads: where the bundled demo data lives, the check of a data set
root, the train / validation / test splits (through dtl_fast.data.open_split: a raw image + video
folder or a prepared data set) and their DataLoaders (a DistributedSampler for training)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from dtl_fast.train.distributed import Dist

TRAIN_SPLITS = ("train", "validation", "test")


def demo_root(seed: int) -> Path:
    """Where the bundled demo data of `seed` is built: $DTL_FAST_CACHE or ~/.cache/dtl_fast."""
    cache = os.environ.get("DTL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dtl_fast")
    return Path(cache) / f"demo-digits-seed{seed}"


def check_layout(root: Path, splits=None) -> None:
    """Raises ValueError naming --data when a raw folder lacks a split folder (default: all of
    train, validation, test). A prepared data set is checked by open_split itself."""
    from dtl_fast.data import SPLITS, is_prepared

    if is_prepared(root):
        return
    splits = SPLITS if splits is None else splits
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"--data {root}: missing the split folder(s) {', '.join(missing)} "
                         f"(expected {', '.join(str(root / s) for s in splits)}, each with one "
                         "folder per class)")


def open_datasets(root: Path, config, dist_info: Dist, classes=None, splits=TRAIN_SPLITS) -> dict:
    """{split: dataset} for each of `splits` of `root`, with the TrainConfig's image / video
    settings; each checks every file before anything trains. classes: the label order (None:
    the first split's class folders, used for the others). Raises ValueError naming --data for
    a split with no usable sample; BadSampleError (on_bad_sample="error") names the bad files."""
    from dtl_fast.data import open_split

    out = {}
    for split in splits:
        stats = {k: tuple(v) if len(v) > 1 else tuple(v) * config.channels
                 for k, v in (("mean", config.mean), ("std", config.std)) if v is not None}
        with warnings.catch_warnings():
            if not dist_info.main:
                # every rank reads the same files; rank 0 reports what was skipped, once
                warnings.simplefilter("ignore")
            ds = open_split(root, split, image_size=config.image_size, frame_size=config.frame_size,
                            max_frames=config.max_frames, channels=config.channels, classes=classes,
                            on_bad_sample=config.on_bad_sample, workers=config.workers,
                            progress=bool(config.progress and dist_info.main), **stats)
        if classes is None:
            classes = list(ds.classes)
            if len(classes) < 2:
                raise ValueError(f"--data {root}: {root / split} holds {len(classes)} class "
                                 f"folder(s) {classes}; DTL learns to tell classes apart and needs "
                                 "at least 2 (one folder per class in each split)")
        if len(ds) == 0:
            raise ValueError(f"--data {root}: the {split} split has no usable samples "
                             f"({len(getattr(ds, 'skipped', []))} skipped)")
        out[split] = ds
    return out


def make_loaders(config, datasets: dict, dist_info: Dist, device: torch.device):
    """(train sampler, train loader, {"validation": loader, "test": loader}). The train loader
    gives each rank batch_size / world samples of every global batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    from dtl_fast.data import collate_multimodal

    pin = device.type == "cuda"
    # num_replicas=1 in one process too, so one process and N processes shuffle identically.
    sampler = DistributedSampler(datasets["train"], num_replicas=dist_info.world, rank=dist_info.rank,
                                 shuffle=True, seed=config.seed, drop_last=False)
    train_loader = DataLoader(datasets["train"], batch_size=config.batch_size // dist_info.world,
                              sampler=sampler, num_workers=config.workers, drop_last=False,
                              collate_fn=collate_multimodal, pin_memory=pin,
                              persistent_workers=config.workers > 0)
    evals = {split: DataLoader(datasets[split], batch_size=config.batch_size, shuffle=False,
                               num_workers=config.workers, collate_fn=collate_multimodal, pin_memory=pin)
             for split in ("validation", "test")}
    return sampler, train_loader, evals
