"""Prepared data sets (`dtl-fast data prepare DIR OUT`) and `open_split`, the one entry point the
training loop uses to open a split of either a raw image + video folder or a prepared data set.

(Stub: the prepared format is being written; for now every root is a raw folder.)
"""
from __future__ import annotations

import inspect
import os


def is_prepared(root) -> bool:
    """True when `root` is the output of `dtl-fast data prepare` (it holds the manifest)."""
    return os.path.isfile(os.path.join(os.fspath(root), "prepared.json"))


def open_split(root, split: str, **options):
    """One split of a data set: a MultiModalFolder for a raw folder, a prepared split for the
    output of `dtl-fast data prepare`. options: MultiModalFolder's keyword arguments
    (image_size, frame_size, max_frames, channels, mean, std, classes, on_bad_sample, workers,
    progress)."""
    from dtl_fast.data.folder import MultiModalFolder

    accepted = inspect.signature(MultiModalFolder.__init__).parameters
    return MultiModalFolder(root, split, **{k: v for k, v in options.items() if k in accepted})
