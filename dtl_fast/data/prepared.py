"""Prepared data sets (`dtl-fast data prepare DIR OUT`) and `open_split`, the one entry point the
training loop uses to open a split of either a raw image + video folder or a prepared data set.

A raw folder is decoded and resized again in every epoch (PNG / JPEG / H.264 decoding, then a
bilinear resize); on a GPU that, not the model, sets the pace. `prepare` decodes every image and
clip once, at the training resolution and frame budget, into uint8 arrays on disk that training
maps into memory (`np.load(mmap_mode="r")`): reading a sample is a memory copy, and only the
normalisation (`video.normalise`, (pixel / 255 - mean) / std) is left for load time, so a
prepared split yields bitwise the same tensors as `MultiModalFolder` on the raw files, for any
mean / std.

Format (version 1)::

    OUT/prepared.json            the manifest (below); written last, so its presence means the
                                 data set is complete
    OUT/<split>/images.npy       uint8 [N, H, W, C]          every image, in sample order
    OUT/<split>/frames.npy       uint8 [sum T_i, H', W', C]  every clip's kept frames, concatenated
    OUT/<split>/offsets.npy      int64 [N]   first row of sample i in frames.npy
    OUT/<split>/lengths.npy      int64 [N]   T_i, frames of sample i (1 <= T_i <= max_frames)
    OUT/<split>/labels.npy       int64 [N]   index of the class in the manifest's "classes"

Every array is a standard NumPy .npy file (its header holds dtype and shape). prepared.json
holds: "format" ("dtl_fast.prepared") and "version" (1); "image_size" and "frame_size" ([H, W]),
"max_frames" (int or null), "channels" (1 or 3), "on_bad_sample"; "source" (the raw root, an
absolute path); "classes" (label order: the train split's class folders; without a train
split, the class folders of every prepared split together, sorted); and per split in
"splits": "count", "frames" (sum T_i), "class_folders" (the split's own class folders, so
`classes=None` means what it means for a raw split), "samples" ([image, video, label] with paths
relative to "source"), "num_frames" (each clip's frame count on disk, before subsampling),
"skipped" ([path, reason], paths relative to "source"), and "arrays": per array its file, dtype,
shape, size in bytes, modification time and SHA-256.

One file per array per split, not shards of bounded size: a memory map is indexed in O(1) and
the operating system reads only the pages a sample touches, so splitting a file would add
bookkeeping and no speed on a local disk (10,000 clips of 16 frames at 64 x 64 x 3 is 2 GB, one
ordinary file).

Integrity: opening a split checks every array file's size and .npy header against the manifest
(a truncated or replaced file is an error naming it), loads the small index arrays and checks
they are consistent (offsets = cumulative lengths, lengths within the frame budget, labels
within the classes), and when a file's modification time differs from the recorded one
re-hashes it (SHA-256) and refuses it if its bytes changed. Unchanged files cost a `stat`.

The prepared set is a snapshot of the raw files: after changing them, prepare again with
`--overwrite`. Preparing writes into a hidden temporary sibling of OUT that is renamed into
place at the end, so an interrupted run never leaves a half-written OUT; an existing OUT is only
replaced (with overwrite=True) when it is the output of an earlier prepare (its manifest and the
size and .npy header of every file beside it agree), checked before decoding and again just
before the rename.

    from dtl_fast.data import open_split
    from dtl_fast.data.prepared import prepare
    prepare("data/raw", "data/prepared", image_size=16, max_frames=8, workers=2)
    train = open_split("data/prepared", "train", image_size=16, max_frames=8)   # PreparedSplit
    image, video, label = train[0]     # float32 [C, H, W], float32 [T, C, H', W'], int
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import inspect
import json
import operator
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dtl_fast.data._paths import (
    follow,
    inside,
    keep_aside,
    lexical,
    refuse_mount_point,
    refuse_the_working_folder,
)
from dtl_fast.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    BadSampleError,
    MultiModalFolder,
    check_decode_options,
    check_stats,
    class_folder_names,
    empty_class_error,
    empty_class_folders,
)
from dtl_fast.data.video import (
    ReadError,
    as_size,
    load_image_uint8,
    load_video_uint8,
    normalise,
    subsample_indices,
)

MANIFEST = "prepared.json"
FORMAT = "dtl_fast.prepared"
VERSION = 1
ARRAYS = ("images", "frames", "offsets", "lengths", "labels")
_INDEX_ARRAYS = ("offsets", "lengths", "labels")
# what read_manifest requires of a version-1 manifest (and so what an earlier output must hold)
_REQUIRED = ("image_size", "frame_size", "max_frames", "channels", "classes", "splits", "source")
# open_split's options that only matter while decoding raw files: accepted and ignored here
_DECODE_ONLY = ("workers", "progress", "manifest")
_CHUNK = 32  # samples per task of a decoding worker


class PreparedDataError(ValueError):
    """A prepared data set that cannot be used as it is on disk: manifest missing fields or of
    another format version, an array file missing, truncated, replaced or changed since it was
    written. The message names the file and what is wrong."""


def is_prepared(root) -> bool:
    """True when `root` is the output of `dtl-fast data prepare` (it holds OUT/prepared.json;
    whether that manifest and its arrays are intact is checked by `open_split`)."""
    return os.path.isfile(os.path.join(os.fspath(root), MANIFEST))


def open_split(root, split: str, **options):
    """One split of a data set: `PreparedSplit` for the output of `dtl-fast data prepare`, else a
    `MultiModalFolder` of the raw folder. Both yield (image float32 [C, H, W], video float32
    [T, C, H', W'], label int) per sample, bitwise the same for the same files and options.

    options: image_size, frame_size, max_frames, channels, mean, std, classes, on_bad_sample,
    workers, progress, manifest (MultiModalFolder's keyword arguments; workers / progress /
    manifest only concern the check of raw files and are ignored for a prepared split). On a
    prepared split image_size, frame_size, max_frames and channels must be those it was
    prepared with (ValueError naming the flag and both values); mean / std may be anything
    (applied at load time).
    """
    known = ("image_size", "frame_size", "max_frames", "channels", "mean", "std", "classes",
             "on_bad_sample") + _DECODE_ONLY
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise TypeError(f"open_split: unknown option(s) {unknown}; known: {list(known)}")
    if is_prepared(root):
        return PreparedSplit(root, split, **options)
    accepted = inspect.signature(MultiModalFolder.__init__).parameters
    # a MultiModalFolder without a parallel check does not take workers / progress
    return MultiModalFolder(root, split, **{k: v for k, v in options.items() if k in accepted})


# ----------------------------------------------------------------------------------------------
# reading


def _sha256(path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _npy_header(path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy file's header; PreparedDataError if unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except (OSError, ValueError, EOFError) as exc:
        raise PreparedDataError(f"{path}: not a readable .npy array file ({exc}); prepare the data "
                                "set again with --overwrite") from exc
    if fortran:
        raise PreparedDataError(f"{path}: a Fortran-ordered array, not written by dtl-fast data prepare")
    return tuple(shape), dtype, offset


_MANIFESTS: dict = {}  # path -> (stat key, parsed manifest): the three splits parse it once


def read_manifest(root) -> dict:
    """OUT/prepared.json as a dict (treat it as read-only: it is shared with later calls while
    the file is unchanged), checked for the format and version this code reads.
    FileNotFoundError when it is missing, PreparedDataError when it is not such a manifest."""
    path = os.path.abspath(os.path.join(os.fspath(root), MANIFEST))
    # a folder holding prepared.json is taken for a prepared data set: say so when the file is
    # not a manifest (a raw folder with a file of that name), and do not suggest --overwrite,
    # which replaces only an output it recognises (_check_out)
    named = (f"A folder holding {MANIFEST} is read as a prepared data set: if {root} is raw data, "
             f"rename that file; if it is the output of `dtl-fast data prepare`, prepare the raw "
             "data again into a new folder")
    try:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if path in _MANIFESTS and _MANIFESTS[path][0] == key:
            return _MANIFESTS[path][1]
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{root} is not a prepared data set (no {MANIFEST}); make one with "
                                f"`dtl-fast data prepare RAW_DIR {root}`") from None
    except (OSError, ValueError) as exc:
        raise PreparedDataError(f"{path}: unreadable or not JSON ({exc}). {named}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedDataError(f"{path}: not a dtl-fast prepared data set manifest (format "
                                f"{manifest.get('format') if isinstance(manifest, dict) else None!r}). "
                                f"{named}")
    if manifest.get("version") != VERSION:
        raise PreparedDataError(f"{path}: format version {manifest.get('version')!r}, this dtl_fast "
                                f"reads version {VERSION}; prepare the data set again with --overwrite")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise PreparedDataError(f"{path}: the manifest lacks {missing}; prepare the data set again "
                                "with --overwrite")
    _MANIFESTS[path] = (key, manifest)
    return manifest


def _check_array(root: str, split: str, name: str, entry: dict) -> str:
    """Checks one array file against its manifest entry; returns its path."""
    path = os.path.join(root, entry["file"])
    again = "; prepare the data set again with `dtl-fast data prepare ... --overwrite`"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: the {split} split's {name} array is missing{again}") from None
    if st.st_size != entry["bytes"]:
        raise PreparedDataError(f"{path}: {st.st_size} bytes, the manifest says {entry['bytes']}: the "
                                f"file is truncated or was changed after it was prepared{again}")
    shape, dtype, _ = _npy_header(path)
    if shape != tuple(entry["shape"]) or dtype != np.dtype(entry["dtype"]):
        raise PreparedDataError(f"{path}: holds {dtype} {list(shape)}, the manifest says "
                                f"{entry['dtype']} {entry['shape']}{again}")
    if st.st_mtime_ns != entry["mtime_ns"] and _sha256(path) != entry["sha256"]:
        # a copy without preserved times lands here too: its bytes still hash the same
        raise PreparedDataError(f"{path}: its contents changed after it was prepared (SHA-256 "
                                f"differs from the manifest's){again}")
    return path


def _identity(path) -> tuple:
    """(device, inode, size, mtime_ns) of a file, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PreparedSplit(Dataset):
    """One split of a prepared data set (`dtl-fast data prepare`), read from memory-mapped uint8
    arrays; a drop-in for `MultiModalFolder` on the raw folder it was prepared from.

    Args:
        root: the prepared folder (OUT of `dtl-fast data prepare`).
        split: a split that was prepared ("train", "validation", "test").
        image_size, frame_size, max_frames, channels: must equal the prepared ones (int or
            (H, W); frame_size None means image_size); ValueError naming the flag otherwise.
        mean, std: per-channel normalisation applied when a sample is read (any values; as for
            MultiModalFolder, a 3-entry mean / std is averaged for 1 channel).
        classes: class names in label order; None: this split's own class folders (as
            MultiModalFolder). A class of the split missing from it is a ValueError.
        on_bad_sample: "error" raises BadSampleError when samples were skipped while preparing
            (as MultiModalFolder would on the raw files); "skip" warns and lists them in .skipped.
        workers, progress, manifest: ignored (nothing is decoded); accepted so both kinds of
            split open with the same options.

    Attributes as MultiModalFolder: root, split, classes, class_to_idx, samples ((image_path,
    video_path, label) of the raw files), skipped, num_frames, image_size, frame_size,
    max_frames, channels, mean, std (float32 [C, 1, 1]); plus source (the raw root) and
    lengths (int64 [N], frames per sample after subsampling).

    dataset[i] -> (image float32 [C, H, W], video float32 [T, C, H', W'], label int).
    The arrays are mapped lazily in each process that reads (DataLoader workers map their own;
    pickling the dataset carries only the index arrays and paths).
    """

    def __init__(self, root, split: str = "train", *, image_size=32, frame_size=None, max_frames=16,
                 channels: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=None,
                 on_bad_sample: str = "error", workers=None, progress=None, manifest=None):
        check_decode_options(on_bad_sample, max_frames, channels)
        image_size = as_size(image_size, "image_size")
        frame_size = image_size if frame_size is None else as_size(frame_size, "frame_size")
        self.root = os.fspath(root)
        self.split = split
        m = read_manifest(self.root)
        splits = m["splits"]
        if not isinstance(split, str) or split not in splits:
            raise FileNotFoundError(f"split {split!r} is not in the prepared data set {self.root} "
                                    f"(it holds {sorted(splits)})")
        asked = {"image_size": list(image_size), "frame_size": list(frame_size),
                 "max_frames": max_frames, "channels": channels}
        differ = [k for k, v in asked.items() if m[k] != v]
        if "image_size" in differ and asked["frame_size"] == asked["image_size"] and \
                m["frame_size"] == m["image_size"]:
            differ.remove("frame_size")  # frames follow the image size on both sides
        if differ:
            flags = {k: "--" + k.replace("_", "-") for k in asked}
            what = ", ".join(f"{k} ({flags[k]}) {_show(asked[k])} asked, {_show(m[k])} prepared"
                             for k in differ)
            use = " ".join(f"{flags[k]} {_show(m[k])}" for k in differ)
            # the whole setting in the command, so the new prepare matches every flag at once
            again = " ".join(f"{flags[k]} {_show(v)}" for k, v in asked.items()
                             if v is not None and not (k == "frame_size" and v == asked["image_size"]))
            raise ValueError(f"{self.root} was prepared with other settings: {what}. Pass {use}, or "
                             "prepare it again with `dtl-fast data prepare "
                             f"{m['source']} {self.root} {again} --overwrite`")
        self.image_size, self.frame_size = image_size, frame_size
        self.max_frames, self.channels = max_frames, channels
        self.mean = check_stats(mean, "mean", channels, positive=False)
        self.std = check_stats(std, "std", channels, positive=True)
        self.on_bad_sample = on_bad_sample
        self.source = m["source"]
        s = splits[split]

        folders = list(s["class_folders"])
        if classes is None:
            # as MultiModalFolder on the raw split: its own class folders, and one that held no
            # sample (not even a bad one) is an error, not a class no sample teaches. prepare
            # labels every split with train's classes, so such a folder was prepared as a class
            # with no sample here; the raw files are not read again: the sample and skipped lists
            # say which class folders held something (paths "<split>/<class>/...").
            rels = [img for img, _, _ in s["samples"]] + [p for p, _ in s["skipped"]]
            held = {parts[1] for parts in (p.replace(os.sep, "/").split("/") for p in rels) if len(parts) > 2}
            empty = [f for f in folders if f not in held]
            if empty:
                raise empty_class_error(os.path.join(self.source, split), empty)
            self.classes = folders
        else:
            if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes:
                raise ValueError(f"classes must be None or a non-empty list of class names, got {classes!r}")
            if not all(isinstance(c, str) and c for c in classes):
                raise ValueError(f"classes must hold non-empty strings, got {classes!r}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes holds a name twice: {classes!r}")
            unknown = [f for f in folders if f not in classes]
            if unknown:
                raise ValueError(f"class folder(s) {unknown} of the {split} split of {self.root} "
                                 f"(prepared from {os.path.join(self.source, split)}) are not in "
                                 f"classes={list(classes)}")
            self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        where = f"{os.path.join(self.source, split)} (as recorded in {os.path.join(self.root, MANIFEST)})"
        self.skipped = [(os.path.join(self.source, p), r) for p, r in s["skipped"]]
        if self.skipped and on_bad_sample == "error":
            raise BadSampleError(self.skipped, where)
        if self.skipped:
            warnings.warn(f"PreparedSplit: {len(self.skipped)} bad sample(s) of {where} were left out "
                          f"when it was prepared (listed in .skipped), e.g. {self.skipped[0][0]}: "
                          f"{self.skipped[0][1]}", stacklevel=2)

        arrays = s["arrays"]
        if sorted(arrays) != sorted(ARRAYS):
            raise PreparedDataError(f"{os.path.join(self.root, MANIFEST)}: the {split} split lists the "
                                    f"arrays {sorted(arrays)}, expected {sorted(ARRAYS)}")
        self._paths = {name: _check_array(self.root, split, name, arrays[name]) for name in ARRAYS}
        # which files were checked: a process that maps them later (a DataLoader worker, the
        # next epoch) must map these, not what a `prepare --overwrite` has put there since
        self._identity = {name: _identity(self._paths[name]) for name in ("images", "frames")}
        index = {name: np.load(self._paths[name]) for name in _INDEX_ARRAYS}
        n, total = int(s["count"]), int(s["frames"])
        lengths, offsets, labels = index["lengths"], index["offsets"], index["labels"]
        manifest_classes = list(m["classes"])
        problem = None
        if not (len(lengths) == len(offsets) == len(labels) == len(s["samples"]) == n):
            problem = "the arrays and the sample list differ in length"
        elif n and (lengths.min() < 1 or (max_frames is not None and lengths.max() > max_frames)):
            problem = f"a clip length outside 1..{max_frames}"
        elif n and (offsets[0] != 0 or np.any(offsets[1:] != np.cumsum(lengths)[:-1])
                    or offsets[-1] + lengths[-1] != total):
            problem = "frame offsets that do not follow the clip lengths"
        elif n and (labels.min() < 0 or labels.max() >= len(manifest_classes)):
            problem = "labels outside the class list"
        elif any(int(lab) != int(rec[2]) for lab, rec in zip(labels, s["samples"])):
            problem = "labels that differ from the manifest's sample list"
        if problem:
            raise PreparedDataError(f"{os.path.join(self.root, split)}: inconsistent index arrays "
                                    f"({problem}); prepare the data set again with --overwrite")
        # labels in this split's class order (the manifest's are indices into its "classes")
        missing = sorted({manifest_classes[i] for i in np.unique(labels)} - set(self.classes))
        if missing:  # only reachable if the manifest's class_folders were edited
            raise ValueError(f"classes={self.classes} lacks {missing}, classes of samples in "
                             f"{os.path.join(self.root, split)}")
        remap = np.array([self.class_to_idx.get(c, -1) for c in manifest_classes], dtype=np.int64)
        self.labels = remap[labels]
        self.lengths = lengths.astype(np.int64)
        self.offsets = offsets.astype(np.int64)
        prefix = os.path.join(self.source, "")  # "source/": a join per path cost 0.1 s per 10,000
        self.samples = [(prefix + img, prefix + vid, int(lab))
                        for (img, vid, _), lab in zip(s["samples"], self.labels.tolist())]
        self.num_frames = [int(t) for t in s["num_frames"]]
        self._maps = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.samples)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, frames) memory-mapped read-only, mapped once per process (as plain ndarray
        views of the np.memmap: np.memmap's Python-level __getitem__ cost 0.5 ms a batch)."""
        if self._maps is None or self._pid != os.getpid():
            maps = tuple(np.load(self._paths[name], mmap_mode="r").view(np.ndarray)
                         for name in ("images", "frames"))
            # stat after mapping: a file replaced before np.load opened it shows another identity
            for name in ("images", "frames"):
                if _identity(self._paths[name]) != self._identity[name]:
                    raise PreparedDataError(
                        f"{self._paths[name]}: replaced or changed since this split was opened (a "
                        "`dtl-fast data prepare --overwrite` while it was in use?); open the data "
                        "set again")
            self._maps = maps
            self._pid = os.getpid()
        return self._maps

    def _index(self, index) -> int:
        i = operator.index(index)
        n = len(self.samples)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a split of {n} samples")
        return i

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = self._index(index)
        images, frames = self._arrays()
        o, t = self.offsets[i], self.lengths[i]
        # np.array copies out of the read-only map (torch refuses to wrap read-only memory)
        image = normalise(np.array(images[i]), self.mean, self.std)
        video = normalise(np.array(frames[o:o + t]), self.mean, self.std)
        return image, video, int(self.labels[i])

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A batch of samples at once (DataLoader calls this instead of __getitem__ per index):
        one gather and one normalisation per batch instead of per sample; the same values as
        __getitem__ (normalisation is elementwise)."""
        idx = np.array([self._index(i) for i in indices], dtype=np.int64)
        if idx.size == 0:
            return []
        images, frames = self._arrays()
        lengths = self.lengths[idx]
        starts = self.offsets[idx]
        # the rows of every clip of the batch, in batch order
        rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        image = self._normalise_batch(images[idx])  # fancy indexing copies out of the map
        video = self._normalise_batch(frames[rows])
        clips = torch.split(video, lengths.tolist())
        return list(zip(image.unbind(0), clips, self.labels[idx].tolist()))

    def _normalise_batch(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float32 [B, C, H, W]: bitwise what `normalise` gives (the same
        three float32 operations on every element: * float32(1 / 255), - mean[c], / std[c]),
        faster for a batch: in NumPy, one thread, each row of H * W * C pixels meeting a tiled
        copy of mean / std in one contiguous pass. normalise broadcasts [C, 1, 1] over a
        channels-last view (an inner loop of C elements), and torch's intra-op threads stall
        when a core is busy (a DataLoader with workers=0 on a shared CPU: 100 ms per batch)."""
        b, h, w, c = pixels.shape
        row = h * w * c
        tiles = self.__dict__.setdefault("_tiles", {})
        if row not in tiles:
            tiles[row] = (self.mean.reshape(c).repeat(h * w).numpy(),
                          self.std.reshape(c).repeat(h * w).numpy())
        mean, std = tiles[row]
        x = pixels.reshape(b, row).astype(np.float32)
        np.multiply(x, np.float32(1.0 / 255.0), out=x)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
        return torch.from_numpy(x).view(b, h, w, c).movedim(-1, -3)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None  # each process maps the files itself; nothing big is pickled
        state["_pid"] = None
        state.pop("_tiles", None)
        return state

    def __repr__(self) -> str:
        return (f"PreparedSplit({self.root!r}, split={self.split!r}, {len(self)} samples, "
                f"{len(self.classes)} classes, image_size={self.image_size}, frame_size={self.frame_size}, "
                f"max_frames={self.max_frames}, channels={self.channels}"
                + (f", skipped={len(self.skipped)}" if self.skipped else "") + ")")


def _show(value) -> str:
    """A setting as a user writes it on the command line: 16 for [16, 16], 16x24 otherwise."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# writing


def _decode_chunk(task) -> int:
    """Decodes samples [start, stop) of a split into its (pre-allocated) array files; runs in a
    decoding worker process or in the caller. Returns the number of samples written."""
    (images_path, frames_path, start, samples, offsets, lengths, totals,
     image_size, frame_size, mode, max_frames) = task
    images = np.load(images_path, mmap_mode="r+")
    frames = np.load(frames_path, mmap_mode="r+")
    for k, (image_path, video_path, _) in enumerate(samples):
        try:
            image = load_image_uint8(image_path, image_size, mode)
            clip = load_video_uint8(video_path, frame_size, mode, max_frames, totals[k])
        except ReadError as exc:  # the file changed after the check
            raise BadSampleError([(exc.path, exc.reason + " (changed since the check?)")]) from None
        if clip.shape[0] != lengths[k]:
            raise BadSampleError([(video_path, f"decoded {clip.shape[0]} frames, the check found "
                                               f"{lengths[k]}: the file changed during prepare")])
        images[start + k] = image
        frames[offsets[k]:offsets[k] + lengths[k]] = clip
    # no flush: the maps are shared, so the pages are the file's; the caller fsyncs each file
    # once at the end (an msync per chunk would sync the whole mapping every time)
    del images, frames
    return len(samples)


def _array_entry(root: Path, rel: str) -> dict:
    path = root / rel
    with open(path, "rb+") as f:  # on disk before the manifest says the set is complete
        os.fsync(f.fileno())
    shape, dtype, _ = _npy_header(path)
    st = os.stat(path)
    return {"file": rel, "dtype": str(dtype), "shape": list(shape), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _allocate_split(ds, tmp: Path, split: str, manifest_classes: list) -> dict:
    """Creates tmp/split with its index arrays and its image and frame arrays at full size
    (sparse: `_reserve_space` allocates their blocks); returns the split's layout."""
    (tmp / split).mkdir()
    n = len(ds.samples)
    lengths = np.array([len(subsample_indices(t, ds.max_frames)) for t in ds.num_frames], dtype=np.int64)
    offsets = np.zeros(n, dtype=np.int64)
    if n:
        offsets[1:] = np.cumsum(lengths)[:-1]
    total = int(lengths.sum())
    c = ds.channels
    label_of = {c_: i for i, c_ in enumerate(manifest_classes)}
    labels = np.array([label_of[ds.classes[lab]] for _, _, lab in ds.samples], dtype=np.int64)
    paths = {name: tmp / split / f"{name}.npy" for name in ARRAYS}
    # allocated full size now, filled in place by the decoders
    np.lib.format.open_memmap(paths["images"], "w+", np.uint8, (n, *ds.image_size, c)).flush()
    np.lib.format.open_memmap(paths["frames"], "w+", np.uint8, (total, *ds.frame_size, c)).flush()
    for name, arr in (("offsets", offsets), ("lengths", lengths), ("labels", labels)):
        np.save(paths[name], arr)
    return {"paths": paths, "lengths": lengths, "offsets": offsets, "labels": labels, "total": total}


# errno values of a full disk or an exhausted quota; a file past the size limit fails alike
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _NoSpaceError(OSError):
    """Not enough disk space for a prepared data set (an OSError with errno ENOSPC; the message
    names OUT and the bytes needed)."""


def _no_space(name: str, folder: Path, needed: int, why: str) -> _NoSpaceError:
    free = shutil.disk_usage(folder).free if folder.is_dir() else None
    has = f"; {free} bytes ({free / 2**30:.2f} GiB) are free there" if free is not None else ""
    return _NoSpaceError(errno.ENOSPC, f"not enough disk space to prepare OUT {name}: its image and "
                                       f"frame arrays need {needed} bytes ({needed / 2**30:.2f} GiB) "
                                       f"in {folder} ({why}){has}. Nothing was kept; free space or "
                                       "choose an OUT on another disk (a smaller --image-size, "
                                       "--frame-size or --max-frames needs less)")


def _reserve_space(files: list, name: str, folder: Path) -> None:
    """Allocates every block of the (sparse) array files now, so a full disk is an error naming
    OUT here, before decoding, and never a SIGBUS later: the decoders write through memory maps,
    and a page of a map that the file system cannot back kills the process with "Bus error"
    (exit 135), no Python error, no clean-up. posix_fallocate where the platform and file
    system have it; elsewhere (macOS; a file system that refuses it) a check of the free space,
    which another writer filling the disk meanwhile can still defeat."""
    unreserved = 0
    for path in files:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except AttributeError:  # no posix_fallocate on this platform
            unreserved += size
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space(name, folder, sum(os.path.getsize(f) for f in files),
                                exc.strerror or str(exc)) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                raise
            unreserved += size  # the file system cannot preallocate
        finally:
            os.close(fd)
    if unreserved and unreserved > shutil.disk_usage(folder).free:
        raise _no_space(name, folder, sum(os.path.getsize(f) for f in files), "checked before writing")


def _prepare_split(ds, tmp: Path, split: str, manifest_classes: list, progress: bool, pool,
                   layout: dict | None = None) -> dict:
    """Writes one split's arrays into tmp/split (decoding in `pool`, or here when None) and
    returns its manifest entry. layout: what `_allocate_split` returned for it (None: allocate
    here, without reserving the space)."""
    from dtl_fast._progress import progress_bar  # tqdm, one line per interval in a log

    if layout is None:
        layout = _allocate_split(ds, tmp, split, manifest_classes)
    # the split's own class folders, listed as MultiModalFolder lists them (classes=None)
    class_folders = class_folder_names(os.path.join(ds.root, split))
    n = len(ds.samples)
    paths, offsets, lengths, labels = layout["paths"], layout["offsets"], layout["lengths"], layout["labels"]
    total = layout["total"]
    tasks = [(str(paths["images"]), str(paths["frames"]), s, ds.samples[s:s + _CHUNK],
              offsets[s:s + _CHUNK], lengths[s:s + _CHUNK], ds.num_frames[s:s + _CHUNK],
              ds.image_size, ds.frame_size,
              ds._mode, ds.max_frames) for s in range(0, n, _CHUNK)]
    with progress_bar(n, f"prepare {split}", unit=" samples", enabled=progress) as bar:
        done = map(_decode_chunk, tasks) if pool is None else pool.map(_decode_chunk, tasks)
        for count in done:
            bar.update(count)
    source = os.path.abspath(ds.root)

    def rel(p):
        return os.path.relpath(os.path.abspath(p), source)

    return {
        "count": n,
        "frames": total,
        "class_folders": class_folders,
        "samples": [[rel(img), rel(vid), int(lab)] for (img, vid, _), lab in zip(ds.samples, labels)],
        "num_frames": [int(t) for t in ds.num_frames],
        "skipped": [[rel(p), r] for p, r in ds.skipped],
        "arrays": {name: _array_entry(tmp, f"{split}/{name}.npy") for name in ARRAYS},
    }


def _remove_stale(out: Path) -> None:
    """Tidies temporary folders of prepares of `out` that were killed (their pid is gone): a
    half-written `.preparing-` folder is deleted; an earlier output renamed aside (`.old-`) goes
    back into OUT's place when OUT is missing (killed between its two renames; prepare runs this
    before its check of OUT, so the restored output is judged as any OUT is), and is deleted
    only when it is exactly an earlier output, else left alone."""
    prefix = f".{out.name}."
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        kind, _, rest = entry.name[len(prefix):].partition("-") if entry.name.startswith(prefix) else ("", "", "")
        pid = rest.split("-")[0]
        if kind in ("preparing", "old") and pid.isdigit() and entry.is_dir() and not entry.is_symlink():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                try:
                    if kind == "preparing":
                        shutil.rmtree(entry, ignore_errors=True)
                    elif not os.path.lexists(out) and (entry / MANIFEST).is_file():
                        os.rename(entry, out)  # killed between its two renames: the old set is whole
                    elif _earlier_output(entry) == (None, []):
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass
            except OSError:
                pass


def _describe(folder: Path, names: list, limit: int = 10) -> str:
    """'train/, notes.txt and 3 more' for entries of a folder (folders with a slash)."""
    shown = [n + ("/" if (folder / n).is_dir() else "") for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")



def _manifest_problem(manifest: dict):
    """Why a JSON object with this format's "format" is not a manifest prepare wrote, else
    None: for this version, what read_manifest requires plus each split's five arrays recorded
    as <split>/<name>.npy with dtype, shape and size, their shapes following the split's counts;
    for another version (it cannot be read, only replaced), conservatively, the splits and for
    each array a file <split>/<file>.npy with dtype, shape and size recorded, whatever else that
    version holds."""
    current = manifest.get("version") == VERSION
    if current:
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            return f"it lacks {missing}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits or not all(s in SPLITS for s in splits):
        return f'its "splits" is not a record of {", ".join(SPLITS)}'
    for split, entry in splits.items():
        arrays = entry.get("arrays") if isinstance(entry, dict) else None
        if not isinstance(arrays, dict) or not arrays:
            return f"no arrays recorded for its {split} split"
        if current and sorted(arrays) != sorted(ARRAYS):
            return f"its {split} split records the arrays {sorted(arrays)}, prepare writes {list(ARRAYS)}"
        for key, a in arrays.items():
            ok = (isinstance(a, dict) and isinstance(a.get("file"), str) and type(a.get("bytes")) is int
                  and isinstance(a.get("dtype"), str) and isinstance(a.get("shape"), list)
                  and all(type(n) is int and n >= 0 for n in a["shape"]))
            if not ok:
                return f"its {split} split's {key} array has no file, dtype, shape and size recorded"
            if current:
                wrong = a["file"] != f"{split}/{key}.npy"
            else:
                folder, _, file = a["file"].partition("/")
                wrong = folder != split or "/" in file or file.startswith(".") or not file.endswith(".npy")
            if wrong:
                return f"its {split} split's {key} array is recorded as {a['file']!r}"
        if current:
            count, frames = entry.get("count"), entry.get("frames")
            shapes = {k: arrays[k]["shape"][:1] for k in ARRAYS}
            if not (type(count) is int and type(frames) is int and shapes["frames"] == [frames]
                    and all(shapes[k] == [count] for k in ARRAYS if k != "frames")):
                return f"its {split} split's array shapes do not follow its sample and frame counts"
    return None


def _earlier_output(out: Path, files: bool = True) -> tuple:
    """(why, foreign): why the non-empty folder `out` is not recognisably an earlier prepare's
    output (naming OUT/prepared.json; None when it is one), and what else it holds (paths
    relative to OUT, folders with a slash) that replacing it would delete.

    An output is: a prepared.json (a regular file) that is a manifest prepare wrote, checked as
    `_manifest_problem` says for its version, beside split folders whose array files are the
    ones it records, each with the recorded size and a .npy header of the recorded dtype and
    shape (a stat and a header read per file; the contents are not hashed). A user's own file
    that happens to be called prepared.json is not one, nor a copied manifest with nothing of
    prepare's beside it, nor one beside a user's own arrays of the same names. files=False
    checks the manifest only (is a folder given as raw data a prepared set?)."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return f"no {MANIFEST}", []
    if path.is_symlink() or not path.is_file():
        return f"{path} is not a file written by prepare", []
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return f"{path} is not a manifest written by prepare (unreadable or not JSON: {exc})", []
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        if not isinstance(manifest, dict):
            what = f"a JSON {type(manifest).__name__}"
        else:
            what = f'its "format" is {manifest["format"]!r}' if "format" in manifest else 'no "format" field'
        return (f'{path} is not a manifest written by prepare ({what}; prepare writes "format": '
                f'"{FORMAT}")'), []
    problem = _manifest_problem(manifest)
    if problem is not None:
        return f"{path} is not a manifest written by prepare ({problem})", []
    if not files:
        return None, []
    listed = {a["file"]: a for e in manifest["splits"].values() for a in e["arrays"].values()}
    foreign, present, differ = [], 0, []
    for entry in sorted(os.listdir(out)):
        top = out / entry
        if entry == MANIFEST:
            continue
        if entry not in manifest["splits"] or top.is_symlink() or not top.is_dir():
            foreign.append(entry + ("/" if top.is_dir() else ""))
            continue
        for name in sorted(os.listdir(top)):
            rel, p = f"{entry}/{name}", top / name
            if rel not in listed or p.is_symlink() or not p.is_file():
                foreign.append(rel + ("/" if p.is_dir() else ""))
                continue
            present += 1
            a = listed[rel]
            size = p.stat().st_size
            if size != a["bytes"]:
                differ.append(f"{rel} is {size} bytes, {MANIFEST} records {a['bytes']}")
                continue
            try:
                shape, dtype, _ = _npy_header(p)
                same = shape == tuple(a["shape"]) and dtype == np.dtype(a["dtype"])
            except (PreparedDataError, TypeError, ValueError):
                differ.append(f"{rel} is not a .npy array file")
                continue
            if not same:
                differ.append(f"{rel} holds {dtype} {list(shape)}, {MANIFEST} records "
                              f"{a['dtype']} {a['shape']}")
    if not present:
        return f"{path} is there, but no split folder with the arrays prepare writes is beside it", foreign
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        return (f"{path} does not describe the files beside it: {'; '.join(differ[:3])}{more}; if it "
                "is an earlier output that was changed, delete it yourself once you no longer need "
                "it"), foreign
    return None, foreign


def _not_a_manifest_of_prepare(root: Path):
    """None when root/prepared.json is a manifest prepare wrote, else why not."""
    return _earlier_output(root, files=False)[0]


def _check_out(out: Path, name: str, given: Path, source: Path, overwrite: bool) -> None:
    """Refuses an OUT that would lose data or cannot work (errors name OUT as given and, for a
    link, its target). `out` is the resolved folder, `given` the path as the user gave it. Run
    before anything is decoded and again just before the result is renamed into place."""
    if out == source.resolve():
        raise ValueError(f"OUT {name} is the raw data folder itself; choose another folder")
    place = lexical(given)  # where a link OUT itself sits, as well as where it points
    for split in SPLITS:
        split_dir = (source / split).resolve()
        if inside(out, split_dir) or inside(place, split_dir):
            raise ValueError(f"OUT {name} lies inside the raw split folder {source / split}, where it "
                             "would be read as data; choose a folder outside it")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise FileExistsError(f"OUT {name} exists and is not a folder")
    refuse_mount_point(out, name, "OUT", "prepare", "prepared")
    # prepare renames a new folder into OUT's place: a shell inside it would be left in a
    # deleted folder (and '.' itself cannot be renamed onto: EBUSY)
    refuse_the_working_folder(out, name, "OUT", "prepare")
    contents = sorted(os.listdir(out))
    if not contents:
        return
    why, foreign = _earlier_output(out)
    if why is not None:
        raise FileExistsError(f"refusing to write into OUT {name}: it is not empty and is not the output "
                              f"of an earlier `dtl-fast data prepare` ({why}); it holds "
                              f"{_describe(out, contents)}. Nothing was changed; choose another folder")
    # replacing OUT deletes everything under it: only what a prepare wrote may be there (checked
    # with or without overwrite, so --overwrite is never suggested where it would be refused)
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise FileExistsError(f"refusing to overwrite OUT {name}: besides a prepared data set it holds "
                              f"{', '.join(foreign[:10])}{more}. Nothing was changed; remove those or "
                              "choose another folder")
    if not overwrite:
        raise FileExistsError(f"OUT {name} already holds a prepared data set; pass overwrite=True "
                              "(--overwrite) to prepare it again, or choose another folder")


def _discard_old(old: Path, out: Path, tag: str) -> None:
    """Deletes the earlier output renamed aside to `old` once the new one is in place: only when
    it is still exactly an earlier output (the check of OUT, run again on it); anything else is
    kept in a visible sibling of OUT and named in a warning."""
    if _earlier_output(old) == (None, []):
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        kept = keep_aside(old, out, "replaced", tag)
    except OSError:
        kept = old
    warnings.warn(f"{out}: the earlier prepared data set it held was replaced, but what was renamed "
                  "aside no longer looks like prepare's output only (something was written into it "
                  f"meanwhile?), so it was kept in {kept}; delete it when you have looked at it",
                  stacklevel=3)


def _classes_without_train(source: Path, splits: list):
    """The class list of a raw set with no train split: every split's class folders together,
    sorted (what one split's own listing is), so a class whose folder one split lacks or holds
    empty is still a class. A class with no sample in any split (its folders all empty) is a
    ValueError naming them, as an empty class folder of train is. None when no split has a class
    folder (MultiModalFolder then names the split)."""
    folders = {s: class_folder_names(os.path.join(source, s)) for s in splits}
    classes = sorted({c for names in folders.values() for c in names})
    empty = {s: set(empty_class_folders(os.path.join(source, s), names)) for s, names in folders.items()}
    unused = [c for c in classes if all(c in empty[s] for s in splits if c in folders[s])]
    if unused:
        paths = [os.path.join(source, s, c) for c in unused for s in splits if c in folders[s]]
        shown = ", ".join(paths[:20]) + (f" and {len(paths) - 20} more" if len(paths) > 20 else "")
        raise ValueError(
            f"no samples in the class folder{'s' if len(paths) > 1 else ''} {shown}: {source} has no "
            f"train/ split, so its classes are the class folders of {' and '.join(s + '/' for s in splits)} "
            f"together, and {'these classes have' if len(unused) > 1 else f'class {unused[0]!r} has'} no "
            f"sample in any of them; remove {'these folders' if len(paths) > 1 else 'it'} (or add samples: "
            "<sample>.png with <sample>.mp4, another video file or a folder <sample>/ of frames beside it)")
    return classes or None


def prepare(source, out, *, image_size=32, frame_size=None, max_frames=16, channels: int = 3,
            on_bad_sample: str = "error", workers: int = 0, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Decodes every image and clip of the raw data set `source` once, at the training
    resolution and frame budget, into the prepared format (module docstring) under `out`.

    Args:
        source: raw root with train/, validation/, test/ (those present are prepared). With
            train/, its class folders are the classes and label the other splits, as in
            training: an empty class folder of train is a ValueError naming it, one of another
            split is a class with no sample there. Without train/ (a set to evaluate on), the
            classes are the class folders of the present splits together (sorted): a class may
            lack a folder, or have an empty one, in one split; a class with no sample in any
            split is a ValueError naming its folders.
        out: where to write; must not exist, be empty, or (with overwrite=True) be an earlier
            prepare's output: a manifest prepare wrote (any format version; for this one, one
            that read_manifest accepts) beside split folders holding exactly the array files
            it records, each of the recorded size, dtype and shape, and nothing else. Anything
            else is refused with FileExistsError naming it (a user's own file called
            prepared.json included, or one beside a user's own arrays), with or without
            overwrite. A symlink OUT is followed: its target is checked and replaced, the link
            kept; a loop of links, or a link into a folder that does not exist (a drive not
            mounted?), is refused, and so is a mount point (ValueError: prepare renames a new
            folder into OUT's place; give a folder inside it). OUT is checked again just before
            the result is renamed into place: if it changed meanwhile (a file saved into it,
            another prepare into it finishing first), the run is refused and its complete
            output kept in the sibling folder OUT.new-<pid>-<id>, named in the error.
        image_size, frame_size, max_frames, channels, on_bad_sample: as for MultiModalFolder
            (its check lists the samples, so the same samples in the same order are prepared).
        workers: decoding processes (0: decode in this process); also the check's workers when
            MultiModalFolder takes them.
        progress: tqdm progress bars on stderr.

    Returns the manifest as written to out/prepared.json, plus "seconds" (the time it took).
    Raises BadSampleError for bad samples with on_bad_sample="error" (before anything is
    written), ValueError for bad arguments, FileExistsError for an OUT it must not touch, OSError
    (errno ENOSPC) naming OUT and the bytes needed when its disk cannot hold the arrays (their
    space is reserved before any decoding; nothing is kept).
    workers > 0 starts processes with Python's default start method: under "spawn" the calling
    script needs an `if __name__ == "__main__":` guard.
    """
    t0 = time.perf_counter()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    # OUT followed: a symlink's target is checked and replaced (on its own file system), the
    # link kept; a loop, or a link into a folder that is not there, refused naming it
    source_p, given = Path(source).expanduser(), Path(out).expanduser()
    out, name = follow(given, "OUT")
    if not source_p.is_dir():
        raise FileNotFoundError(f"data root {source_p} does not exist or is not a folder")
    if is_prepared(source_p):
        why = _not_a_manifest_of_prepare(source_p)
        if why is None:
            raise ValueError(f"{source_p} is already a prepared data set; give the raw data folder")
        raise ValueError(f"{source_p} holds {MANIFEST} but is not a prepared data set ({why}). A folder "
                         f"holding {MANIFEST} is read as a prepared data set (by `dtl-fast train --data` "
                         "too): rename that file in the raw data folder")
    _remove_stale(out)  # first: an earlier output a killed prepare left aside is judged as OUT
    _check_out(out, name, given, source_p, overwrite)
    splits = [s for s in SPLITS if (source_p / s).is_dir()]
    if not splits:
        raise FileNotFoundError(f"no split folder in {source_p}: expected {', '.join(SPLITS)} "
                                "(each with one folder per class)")

    accepted = inspect.signature(MultiModalFolder.__init__).parameters
    extra = {k: v for k, v in (("workers", workers), ("progress", progress)) if k in accepted}
    opts = dict(image_size=image_size, frame_size=frame_size, max_frames=max_frames,
                channels=channels, on_bad_sample=on_bad_sample, **extra)
    classes = None if "train" in splits else _classes_without_train(source_p, splits)
    datasets = {}
    for split in splits:  # the check first, for every split: a bad file fails before any decoding
        ds = MultiModalFolder(source_p, split, classes=classes, **opts)
        if classes is None:  # train's classes label every split, as in training
            classes = list(ds.classes)
        datasets[split] = ds

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.preparing-{tag}"
    tmp.mkdir()
    old = None
    try:
        # every split's arrays at full size, their disk space reserved, before any decoding
        layouts = {split: _allocate_split(ds, tmp, split, classes) for split, ds in datasets.items()}
        _reserve_space([layout["paths"][a] for layout in layouts.values() for a in ("images", "frames")],
                       name, out.parent)
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
        try:
            split_entries = {split: _prepare_split(ds, tmp, split, classes, progress, pool, layouts[split])
                             for split, ds in datasets.items()}
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        first = datasets[splits[0]]
        from dtl_fast import __version__ as dtl_version

        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "dtl_fast": dtl_version,
            "source": str(source_p.resolve()),
            "image_size": list(first.image_size), "frame_size": list(first.frame_size),
            "max_frames": first.max_frames, "channels": first.channels,
            "on_bad_sample": on_bad_sample, "classes": classes,
            "splits": split_entries,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:  # last: it says the set is complete
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # The check of OUT again, just before anything is replaced: decoding took a while and OUT
        # may have changed meanwhile (a file saved into it, another prepare finishing first). A
        # refusal keeps this run's output, complete, in a visible sibling of OUT.
        try:
            _check_out(out, name, given, source_p, overwrite)
        except (OSError, ValueError) as exc:
            kept = keep_aside(tmp, out, "new", tag)
            raise type(exc)(f"{exc} [found when OUT was checked again, just before this run's output was "
                            "to be put in its place: OUT changed while the data was prepared (another "
                            f"prepare into it?). This run's complete output is kept in {kept}: train on "
                            "it as it is (--data that folder) or move it where you want it]") from None
        if out.is_dir() and os.listdir(out):  # an earlier prepare's output (checked just now)
            old = out.parent / f".{out.name}.old-{tag}"
            try:
                os.rename(out, old)
            except FileNotFoundError:
                old = None  # another prepare --overwrite moved it aside meanwhile
        try:
            # onto nothing or an empty folder, atomically; anything put there since the check
            # makes it fail (ENOTEMPTY, ENOTDIR) rather than be replaced
            os.rename(tmp, out)
        except OSError as exc:
            kept = keep_aside(tmp, out, "new", tag)
            earlier = ""
            if old is not None:
                earlier = f"; the earlier output OUT held is in {keep_aside(old, out, 'earlier', tag)}"
                old = None
            raise FileExistsError(f"OUT {name}: something was put in its place just before this run's "
                                  f"output was ({exc.strerror}; another prepare into it?), and it was "
                                  f"left as it is. This run's complete output is kept in {kept}"
                                  f"{earlier}") from None
        if old is not None:
            _discard_old(old, out, tag)
            old = None
    except BaseException as exc:
        if old is not None and old.exists() and not os.path.lexists(out):
            os.rename(old, out)  # interrupted between the two renames: put the old set back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, _NoSpaceError) and exc.errno in _NO_SPACE:
            # a small file (an index array, the manifest) met the full disk: "[Errno 28] No space
            # left on device" alone would not say where
            raise OSError(exc.errno, f"OUT {name}: {exc.strerror or exc} while writing the prepared "
                                     f"data set in {out.parent}; nothing was kept") from exc
        raise
    manifest["seconds"] = time.perf_counter() - t0
    return manifest
