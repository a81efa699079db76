"""The bundled demo data set: handwritten digits as degraded images and occluded moving clips.

Built from scikit-learn's bundled 8x8 digits (`sklearn.datasets.load_digits`, 1797 samples,
no download) into the MultiModalFolder layout:

    root/{train,validation,test}/<digit>/<index>.png      the image
    root/{train,validation,test}/<digit>/<index>/000.png  the clip's frames
    root/dtl_fast_demo.json                               marker: generator version + parameters

Neither view is enough on its own: the image is noisy and a block hides part of the digit; the
clip shows another person's handwriting of the same digit, smaller, drifting across the frame
with a bar that travels with it and hides one side of it, with per-frame noise and 4..12 frames.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import pathlib
import shutil
import struct
import uuid
import warnings
import zlib

import numpy as np

from dtl_fast.data._paths import follow, keep_aside, refuse_mount_point, refuse_the_working_folder
from dtl_fast.data.folder import SPLITS

MARKER = "dtl_fast_demo.json"
GENERATOR = "dtl_fast.data.demo"
VERSION = 1
_OCCLUDER_GRAY = 0.5


def _load_digits():
    """scikit-learn's bundled digits: images float32 [1797, 8, 8] in [0, 1], labels int64 [1797]."""
    # Read the bundled file directly when it is where scikit-learn keeps it: importing sklearn
    # (and scipy under it) can take longer than building the whole data set.
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            if data.shape == (1797, 65):
                return data[:, :64].reshape(-1, 8, 8) / 16.0, data[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the demo data set needs scikit-learn (pip install scikit-learn): its bundled "
                           "handwritten digits are the data") from exc
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


@functools.cache
def _upsample_matrix(n_out: int, n_in: int = 8) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation (half-pixel centres), so A @ img @ A.T resizes."""
    a = np.zeros((n_out, n_in), np.float32)
    for o in range(n_out):
        x = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        i0 = int(math.floor(x))
        i1 = min(i0 + 1, n_in - 1)
        a[o, i0] += 1.0 - (x - i0)
        a[o, i1] += x - i0
    return a


def _split_and_pair(labels: np.ndarray, params: dict, rng: np.random.Generator):
    """Stratified split (per class of m >= 3 samples: test and validation round(fraction * m),
    at least one each; train the rest, at least one, taken from the larger of the other two,
    validation on a tie) and each sample's video partner: another sample of the same class in
    the same split (itself only when it is its class's single sample in that split)."""
    n_per_class = params["samples_per_class"]
    _, f_val, f_test = params["split_fractions"]
    split_of, partner = {}, {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if n_per_class is not None:
            idx = idx[:n_per_class]
        m = len(idx)
        n_test, n_val = max(1, round(f_test * m)), max(1, round(f_val * m))
        while m - n_test - n_val < 1:
            # rounding up both took every sample (4 per class at (0.2, 0.4, 0.4): 2 + 2): train
            # keeps one. Only such splits change, so every other build keeps its bytes.
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        for i in idx[:n_test]:
            split_of[int(i)] = "test"
        for i in idx[n_test:n_test + n_val]:
            split_of[int(i)] = "validation"
        for i in idx[n_test + n_val:]:
            split_of[int(i)] = "train"
    for split in SPLITS:
        for c in range(10):
            group = rng.permutation([i for i in sorted(split_of) if split_of[i] == split and labels[i] == c])
            for k, i in enumerate(group):
                partner[int(i)] = int(group[(k + 1) % len(group)])  # a cycle: nobody is their own partner unless alone
    return split_of, partner


def _render_image(digit: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    size, ds, jit, occ = p["image_size"], p["digit_size"], p["image_jitter"], p["image_occluder"]
    img = np.zeros((size, size), np.float32)
    a = _upsample_matrix(ds)
    oy, ox = (size - ds) // 2 + rng.integers(-jit, jit + 1, 2)
    oy, ox = int(np.clip(oy, 0, size - ds)), int(np.clip(ox, 0, size - ds))
    img[oy:oy + ds, ox:ox + ds] = a @ digit @ a.T
    if occ > 0:
        # the block always overlaps the digit, so it hides strokes rather than background
        py = int(np.clip(rng.integers(oy - occ // 2, oy + ds - occ // 2 + 1), 0, size - occ))
        px = int(np.clip(rng.integers(ox - occ // 2, ox + ds - occ // 2 + 1), 0, size - occ))
        img[py:py + occ, px:px + occ] = _OCCLUDER_GRAY
    img += rng.normal(0.0, p["image_noise"], img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _render_clip(digit: np.ndarray, p: dict, rng: np.random.Generator) -> np.ndarray:
    size, ds, bar = p["frame_size"], p["video_digit_size"], p["video_occluder"]
    t_len = int(rng.integers(p["min_frames"], p["max_frames"] + 1))
    a = _upsample_matrix(ds)
    glyph = a @ digit @ a.T
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dy, dx = math.sin(angle) * p["motion"], math.cos(angle) * p["motion"]
    side = int(rng.integers(0, 4))  # which side of the digit the bar hides: top, bottom, left, right
    centre = (size - ds) / 2.0
    frames = np.zeros((t_len, size, size), np.float32)
    for t in range(t_len):
        s = t / (t_len - 1) - 0.5 if t_len > 1 else 0.0
        y = int(round(min(max(centre + s * dy, 0), size - ds)))
        x = int(round(min(max(centre + s * dx, 0), size - ds)))
        frames[t, y:y + ds, x:x + ds] = glyph
        if bar > 0:
            if side == 0:
                frames[t, y:y + bar, x:x + ds] = _OCCLUDER_GRAY
            elif side == 1:
                frames[t, y + ds - bar:y + ds, x:x + ds] = _OCCLUDER_GRAY
            elif side == 2:
                frames[t, y:y + ds, x:x + bar] = _OCCLUDER_GRAY
            else:
                frames[t, y:y + ds, x + ds - bar:x + ds] = _OCCLUDER_GRAY
    frames += rng.normal(0.0, p["video_noise"], frames.shape).astype(np.float32)
    return np.clip(frames, 0.0, 1.0)


def render_demo_samples(params: dict):
    """Yields (split, label, stem, image float32 [H, W] in [0, 1], clip float32 [T, H', W']) for
    every sample, in a deterministic order; params as recorded in the marker."""
    images, labels = _load_digits()
    seed = params["seed"]
    split_of, partner = _split_and_pair(labels, params, np.random.default_rng([seed, 0]))
    for i in sorted(split_of):
        # one generator per sample, so a sample's pixels do not depend on which others are built
        rng = np.random.default_rng([seed, 1, i])
        image = _render_image(images[i], params, rng)
        clip = _render_clip(images[partner[i]], params, rng)
        yield split_of[i], int(labels[i]), f"{i:04d}", image, clip


def _check_params(p: dict) -> None:
    def need_int(name, low, high=None):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low or (high is not None and v > high):
            raise ValueError(f"{name} must be an int >= {low}" + (f" and <= {high}" if high is not None else "")
                             + f", got {v!r}")

    def need_float(name, low, high):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high):
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {v!r}")

    need_int("seed", 0)
    if p["samples_per_class"] is not None:
        need_int("samples_per_class", 3)
    need_int("image_size", 8, 1024)
    need_int("digit_size", 4, p["image_size"])
    need_int("image_jitter", 0, p["image_size"])
    need_int("image_occluder", 0, p["digit_size"])
    need_float("image_noise", 0.0, 10.0)
    need_int("frame_size", 8, 1024)
    need_int("video_digit_size", 4, p["frame_size"])
    need_int("video_occluder", 0, p["video_digit_size"])
    need_float("video_noise", 0.0, 10.0)
    need_int("min_frames", 1, 1000)
    need_int("max_frames", p["min_frames"], 1000)
    need_float("motion", 0.0, float(p["frame_size"]))
    fr = p["split_fractions"]
    if (not isinstance(fr, (list, tuple)) or len(fr) != 3 or
            not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in fr)
            or abs(sum(fr) - 1.0) > 1e-6):
        raise ValueError(f"split_fractions must be three numbers in (0, 1) summing to 1 "
                         f"(train, validation, test), got {fr!r}")


def _read_marker(root: pathlib.Path):
    try:
        with open(root / MARKER, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_demo_marker(marker) -> bool:
    """True for the marker of a complete build of this generator (any version or parameters)."""
    return isinstance(marker, dict) and marker.get("generator") == GENERATOR


def is_demo_build(root) -> bool:
    """True when `root` holds a complete build of the demo data set (its marker file names this
    generator), whatever its parameters or version: what overwrite may replace."""
    root = pathlib.Path(root).expanduser()
    return root.is_dir() and _is_demo_marker(_read_marker(root))


def _describe(root: pathlib.Path, names: list, limit: int = 10) -> str:
    """'train/, notes.txt and 3 more' for entries of root (folders with a slash)."""
    shown = [n + ("/" if (root / n).is_dir() else "") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _not_from_the_build(root: pathlib.Path, marker: dict) -> list:
    """What under root's split folders a demo build did not write (relative paths, folders with
    a slash): anything but class folders 0-9 holding <stem>.png + <stem>/<NNN>.png frames, as
    many samples per class as the marker's counts say; symlinks are never the build's. Empty
    when the tree is exactly a build, the only tree overwrite may delete."""
    counts = marker.get("counts")
    # every build records its counts, per split and digit: a marker without them is not one
    if not (isinstance(counts, dict) and all(
            isinstance(counts.get(s), dict) and sorted(counts[s]) == sorted(str(c) for c in range(10))
            and all(type(n) is int and n >= 0 for n in counts[s].values()) for s in SPLITS)):
        return [f"{MARKER} (no sample counts: not written by a build)"]
    classes = {str(c) for c in range(10)}
    found = []
    for split in SPLITS:
        sdir = root / split
        if not os.path.lexists(sdir):
            continue
        if sdir.is_symlink() or not sdir.is_dir():
            found.append(split)
            continue
        for cdir in sorted(sdir.iterdir()):
            rel = f"{split}/{cdir.name}"
            if cdir.name not in classes or cdir.is_symlink() or not cdir.is_dir():
                found.append(rel + ("/" if cdir.is_dir() else ""))
                continue
            samples = 0
            for entry in sorted(cdir.iterdir()):
                frames = cdir / entry.stem
                if (entry.suffix == ".png" and entry.is_file() and not entry.is_symlink()
                        and frames.is_dir() and not frames.is_symlink()):
                    samples += 1
                    continue
                if (entry.is_dir() and not entry.is_symlink()
                        and (cdir / f"{entry.name}.png").is_file()
                        and all(f.suffix == ".png" and f.stem.isdigit() and f.is_file()
                                and not f.is_symlink() for f in entry.iterdir())):
                    continue  # a clip's frame folder
                found.append(f"{rel}/{entry.name}" + ("/" if entry.is_dir() else ""))
            wrote = counts[split][cdir.name]
            if samples != wrote:
                found.append(f"{rel}/ ({samples} samples; the build wrote {wrote})")
    return found


def _real_root(root: pathlib.Path):
    """(the folder to build in, how messages name the root) for a root as given. Symbolic links
    are followed: when root is a link, its target is what the guards check and what is rebuilt
    (in a temporary sibling of the target, so the final rename stays on the target's file
    system), and the link itself is kept. A link that points nowhere on the way (a drive not
    mounted?) or a loop of links (on every Python: os.stat's ELOOP, not Path.resolve, which
    stopped raising in 3.13) is refused naming it, with nothing created; root being a link to a
    folder not yet made is fine when the folder that would hold it exists."""
    return follow(root, "demo data root")


def _refuse_the_working_folder(root: pathlib.Path, name: str, why: str = "") -> None:
    """FileExistsError when root (resolved) is the current folder or holds it: the build renames
    a new folder into root's place, so a shell in it would be left in a deleted folder, seeing
    nothing (a folder cannot be renamed onto '.' either: EBUSY). `why` says why a build is
    needed (`dtl-fast train` reaches this without the user naming a folder)."""
    refuse_the_working_folder(root, name, "demo data root", "the build", why)


def _differences(marker: dict, params: dict) -> str:
    old = marker.get("parameters")
    old = old if isinstance(old, dict) else {}
    diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
    return f"recorded vs asked: {diff}, version {marker.get('version')} vs {VERSION}"


def _guard(root: pathlib.Path, name: str, wanted: dict, overwrite: bool, replace_other_build: bool):
    """What building into root (resolved) would do: None when root already holds the wanted
    build and there is nothing to do, else why a build is needed (for messages). Raises
    FileExistsError, naming root and what it holds, for a root the build must not replace: run
    before the build and again just before its result is renamed into place."""
    if not os.path.lexists(root):
        return "it does not exist yet"
    if not root.is_dir():
        raise FileExistsError(f"demo data root {name} exists and is not a folder")
    marker = _read_marker(root)
    same = (marker is not None and {k: marker.get(k) for k in wanted} == wanted
            and not _train_split_left_empty(marker))
    if same and not overwrite:
        return None
    contents = sorted(p.name for p in root.iterdir())
    if not contents:
        return "it is an empty folder"
    if not _is_demo_marker(marker):
        raise FileExistsError(
            f"{name} is not empty and is not a demo data set built by `dtl-fast data demo` (no "
            f"valid {MARKER}); it holds {_describe(root, contents)}. It may be your own data set: "
            f"nothing was changed. Choose another (new or empty) folder for the demo data")
    foreign = [n for n in contents if n not in SPLITS + (MARKER,)]
    if foreign:
        raise FileExistsError(f"refusing to overwrite {name}: besides a demo data set it holds "
                              f"{_describe(root, foreign)}; remove those or choose another folder")
    # checked before --overwrite is suggested too: it must not be suggested for a tree it would refuse
    inside = _not_from_the_build(root, marker)
    if inside:
        shown = ", ".join(inside[:10]) + (f" and {len(inside) - 10} more" if len(inside) > 10 else "")
        raise FileExistsError(f"refusing to overwrite {name}: its split folders hold what the "
                              f"demo build did not write: {shown}. Nothing was changed; "
                              f"remove those or choose another folder")
    if {k: marker.get(k) for k in wanted} == wanted:  # the same parameters, the old split rule
        other = ("a demo data set with no train sample for some digit (built before the split "
                 "kept one train sample per class)")
    else:
        other = f"a demo data set built with other parameters ({_differences(marker, wanted['parameters'])})"
    if not overwrite and not replace_other_build:
        raise FileExistsError(f"{name} holds {other}; pass overwrite=True (--overwrite) to rebuild it, "
                              "or choose another folder")
    if same:
        return "overwrite=True (--overwrite) asks for it to be rebuilt"
    return f"it holds {other}, which must be rebuilt"


def _train_split_left_empty(marker: dict) -> bool:
    """Whether a build's counts show a digit with no train sample: what the split rule before
    s32 wrote when rounding gave test and validation every sample of a class (e.g. 4 per class
    at fractions (0.2, 0.4, 0.4)). Such a build is not what the same parameters build now (the
    rule keeps one for train), so it is rebuilt; every other build is byte for byte what they
    still build, and stays (no version bump that would rebuild them all)."""
    train = (marker.get("counts") or {}).get("train")
    return isinstance(train, dict) and any(n == 0 for n in train.values())


def _is_whole_build(folder: pathlib.Path) -> bool:
    """True when folder holds exactly a demo build: its marker, nothing beside the split
    folders, nothing in them the build did not write (what may be deleted)."""
    marker = _read_marker(folder)
    return (_is_demo_marker(marker) and all(n in SPLITS + (MARKER,) for n in os.listdir(folder))
            and not _not_from_the_build(folder, marker))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_builds(root: pathlib.Path) -> None:
    """Tidies temp folders left by builds of this root that were killed (their pid is gone): a
    half-made `.building-` folder is deleted; an earlier build renamed aside (`.old-`) goes back
    into root's place when root is missing (killed between its two renames), and is deleted
    only when it is exactly a build, else left alone."""
    if not root.parent.is_dir():
        return
    prefix = f".{root.name}."
    for entry in root.parent.iterdir():
        name = entry.name
        if not name.startswith(prefix):
            continue
        kind, _, rest = name[len(prefix):].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("building", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if entry.is_symlink():
                # a root that was a link, renamed aside by an earlier dtl_fast: unlinking it
                # removes the link only, never what it points to
                entry.unlink()
            elif not entry.is_dir():
                continue
            elif kind == "building":
                shutil.rmtree(entry, ignore_errors=True)
            elif not os.path.lexists(root) and _is_demo_marker(_read_marker(entry)):
                os.rename(entry, root)  # the earlier build is whole: back in place, then judged
            elif _is_whole_build(entry):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _png_bytes(pixels: np.ndarray) -> bytes:
    """float [H, W] in [0, 1] -> an 8-bit grayscale PNG file's bytes.

    Written by hand because Pillow's per-file overhead made saving ~16000 tiny frames the
    slowest part of the build; the bytes are a standard PNG (filter 0, zlib level 6) and depend
    only on the pixels."""
    gray = np.round(pixels * 255.0).astype(np.uint8)
    h, w = gray.shape
    rows = np.zeros((h, w + 1), np.uint8)  # each row starts with its filter type: 0 (none)
    rows[:, 1:] = gray

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def _write_png(path, pixels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(_png_bytes(pixels))


def build_demo_dataset(root, *, seed: int = 0, overwrite: bool = False, samples_per_class=None,
                       image_size: int = 32, digit_size: int = 22, image_jitter: int = 1,
                       image_occluder: int = 15, image_noise: float = 0.25, frame_size: int = 32,
                       video_digit_size: int = 18, video_occluder: int = 9, video_noise: float = 0.3,
                       min_frames: int = 4, max_frames: int = 12, motion: float = 4.0,
                       split_fractions=(0.7, 0.15, 0.15),
                       replace_other_build: bool = False) -> pathlib.Path:
    """Builds the bundled demo data set under `root` and returns root as a pathlib.Path.

    Every sample of scikit-learn's digits (or `samples_per_class` of each digit) becomes:
      - an image, grayscale PNG image_size x image_size: the digit scaled to digit_size px,
        shifted by up to image_jitter px, a gray image_occluder-px square block over part of it,
        Gaussian noise of std image_noise (pixel scale 0..1);
      - a clip, a folder of min_frames..max_frames grayscale PNG frames frame_size x frame_size:
        a *different* sample of the same digit (same split), scaled to video_digit_size px,
        drifting `motion` px in a random direction over the clip, with a video_occluder-px gray
        bar that moves with it and hides one side (top, bottom, left or right), and per-frame
        Gaussian noise of std video_noise.
    Splits: per digit, split_fractions (train, validation, test) of its samples, at least one
    each; class folders "0".."9". Everything is deterministic for `seed` (same bytes).

    Measured with the defaults (logistic-regression proxy, bench/demo_data_proxy.py: flattened
    image; mean of the clip's frames; both concatenated; C=0.03; trained on train, scored on
    test): image 69.1 %, video 69.9 %, both 82.2 % (+12.3 points over the better single view;
    on validation + test: 66.5 / 69.1 / 81.6 %). The models are CNNs, not this proxy.
    Building takes ~12 s on a 2-core machine (~16,000 small PNG files).

    The build goes into a temporary sibling folder that is renamed into place, with the marker
    file (generator version + parameters) written last, so an interrupted build never leaves a
    set that looks complete. If root already holds a complete demo set with the same parameters
    this returns at once; with other parameters (or another generator version) it raises
    FileExistsError unless overwrite=True or replace_other_build=True.

    What may be replaced: only an earlier demo build (the marker of this generator present, next
    to nothing but train/, validation/, test/) or an empty folder. Any other non-empty root, a
    user's own data set included, is refused with FileExistsError naming what it holds, with or
    without overwrite. A root that is a symbolic link is followed: the same rules apply to the
    folder it points to, which is where the set is (re)built; the link stays as it is and the
    returned path is root as given. A link that points nowhere (a drive not mounted?) is refused
    when the folder it would build in does not exist, and so is a loop of links. A root that is
    a mount point is refused (ValueError) before anything is built: the build renames a new
    folder into root's place, which a mount point cannot take; build into a folder inside it.
    The checks run again just before the new build is put in place, so what was written into
    root while the set was built is found: the build is then refused and discarded (its temp
    folder deleted), root left as it is.

    overwrite=True rebuilds an earlier demo build even when its parameters are the same (a
    repair); replace_other_build=True rebuilds it only when they differ and otherwise returns at
    once (what a cache folder of demo builds wants: `dtl-fast train` without --data).
    """
    root = pathlib.Path(root).expanduser()
    params = dict(seed=seed, samples_per_class=samples_per_class, image_size=image_size,
                  digit_size=digit_size, image_jitter=image_jitter, image_occluder=image_occluder,
                  image_noise=image_noise, frame_size=frame_size, video_digit_size=video_digit_size,
                  video_occluder=video_occluder, video_noise=video_noise, min_frames=min_frames,
                  max_frames=max_frames, motion=motion, split_fractions=split_fractions)
    _check_params(params)
    params["split_fractions"] = [float(f) for f in split_fractions]
    params = {k: (float(v) if k in ("image_noise", "video_noise", "motion") else v) for k, v in params.items()}
    wanted = {"generator": GENERATOR, "version": VERSION, "parameters": params}

    given = root
    root, name = _real_root(given)  # a symlink's target is checked and rebuilt; the link stays
    # a build killed between its two renames: its earlier build back first, so the guard
    # judges it (a rerun without overwrite must not replace it)
    _remove_stale_builds(root)
    why = _guard(root, name, wanted, overwrite, replace_other_build)
    if why is None:
        return given
    refuse_mount_point(root, name, "demo data root", "the build", "demo")
    _refuse_the_working_folder(root, name, why)

    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.building-{tag}"
    old = None
    try:
        counts = {s: {str(c): 0 for c in range(10)} for s in SPLITS}
        tmp.mkdir()
        for split in SPLITS:
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True)
        for split, label, stem, image, clip in render_demo_samples(params):
            folder = tmp / split / str(label)
            _write_png(str(folder / f"{stem}.png"), image)
            (folder / stem).mkdir()
            for t, frame in enumerate(clip):
                _write_png(str(folder / stem / f"{t:03d}.png"), frame)
            counts[split][str(label)] += 1
        with open(tmp / MARKER, "w", encoding="utf-8") as f:  # last: it says the set is complete
            json.dump({**wanted, "counts": counts}, f, indent=1, sort_keys=True)
            f.write("\n")
        # The guard again, just before anything is replaced: what it checked may have changed
        # while the set was built (a file saved into root, another build finishing first).
        try:
            why = _guard(root, name, wanted, overwrite, replace_other_build)
            if why is not None:
                _refuse_the_working_folder(root, name, why)
        except OSError as exc:
            raise type(exc)(f"{exc} [found when {name} was checked again, just before the new build "
                            "was to be put in its place: it changed while the set was being built; "
                            "the new build was discarded]") from None
        if why is None:
            return given  # another process built the same set meanwhile
        if root.is_dir() and os.listdir(root):  # an earlier demo build (checked just now)
            old = root.parent / f".{root.name}.old-{tag}"
            try:
                os.rename(root, old)
            except FileNotFoundError:
                old = None  # another build moved it aside meanwhile
        try:
            # onto nothing or an empty folder, atomically; anything put there since the check
            # makes it fail (ENOTEMPTY, ENOTDIR) rather than be replaced
            os.rename(tmp, root)
        except OSError as exc:
            marker = _read_marker(root) if root.is_dir() else None
            if marker is None or {k: marker.get(k) for k in wanted} != wanted:
                raise FileExistsError(
                    f"demo data root {name}: something was put in its place just before the new build "
                    f"was ({exc.strerror}; another build?). It was left as it is and the new build "
                    "was discarded; run the command again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(old):
            if not os.path.lexists(root):
                os.rename(old, root)  # stopped between the two renames: the earlier build goes back
            else:
                _discard(old, root, tag)
    return given


def _discard(old: pathlib.Path, root: pathlib.Path, tag: str) -> None:
    """Deletes the earlier build renamed aside to `old`, once the new one is in place: only when
    it is still exactly a build (the guard's check, run again on it); anything else is kept in
    a visible sibling of root and named in a warning."""
    if old.is_dir() and not old.is_symlink() and _is_whole_build(old):
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        kept = keep_aside(old, root, "replaced", tag)
    except OSError:
        kept = old
    warnings.warn(f"{root}: the earlier demo build it held was replaced, but what was renamed aside "
                  f"no longer looks like a build only (something was written into it meanwhile?), so "
                  f"it was kept in {kept}; delete it when you have looked at it", stacklevel=3)
