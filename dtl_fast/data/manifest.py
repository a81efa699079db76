"""The check manifest: what MultiModalFolder learned about each sample of a split, so that an
unchanged data set is not decoded again on the next run.

One JSON file per split folder, in the cache (never in the data folder, which may be read-only
or shared): `<cache>/manifests/<sha1 of the absolute split folder path>.json`, where <cache> is
$DTL_FAST_CACHE, else ~/.cache/dtl_fast (where the demo data is built too). It records the
absolute split folder it belongs to and, for every sample (image and clip paths): a SHA-1 digest
of the size, mtime_ns, ctime_ns and inode of each of its files (the image; the clip file, or every frame file of
a frame folder, with their names), their count and newest mtime, when it was checked, and the
verdict: ok with the clip's frame count, or bad with the path and reason.

A sample is trusted without decoding only when its files have the recorded sizes, mtimes and
names (the same digest), and the newest mtime is older than the check by RACY_NS: a file
rewritten within the file system's timestamp granularity of its check could otherwise keep the
same stamp (git's "racy clean" problem), so such samples are checked again next time. An added,
changed or removed file changes the digest and is checked again. A manifest that is corrupt, foreign (another folder's)
or from a newer format version is ignored with a warning, never trusted; one written by other
Pillow / PyAV versions, or by an older dtl_fast (format version below VERSION: its check decided
less), is ignored quietly (a decoder upgrade can change what decodes).
Each file's stamp is its size, mtime, ctime and inode, so a file rewritten with the same size
and its old mtime set back (`cp -p`, `touch -r`, an archive extracted again) or one whose
permissions were fixed after a failed check is checked again too. manifest=False checks
everything.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
import warnings

from dtl_fast.data.video import is_image_name

FORMAT = "dtl_fast.data.manifest"
# bump when what a check decides changes (file rules, reasons), so old verdicts go.
# 2: a video file shorter than its container says (cut off) is bad (video._declared_short)
VERSION = 2
RACY_NS = 2_000_000_000  # 2 s: FAT's mtime granularity, far above ext4 / xfs / NFS ticks


def cache_dir() -> str:
    """$DTL_FAST_CACHE, else ~/.cache/dtl_fast: where the demo data and the manifests live."""
    return os.environ.get("DTL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dtl_fast")


def manifest_path(split_dir) -> str:
    """<cache>/manifests/<sha1 of the absolute split folder path>.json."""
    key = hashlib.sha1(os.path.abspath(os.fspath(split_dir)).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(cache_dir(), "manifests", key + ".json")


def _decoders() -> dict:
    """The versions of the libraries whose verdicts the manifest stores."""
    from importlib import metadata

    found = {}
    for name in ("pillow", "av"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _relative(path: str, split_dir: str) -> str:
    # the sample paths are os.path.join(split_dir, ...): strip the prefix (relpath is ~10x slower)
    prefix = split_dir if split_dir.endswith(os.sep) else split_dir + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, split_dir)


def _is_frame(entry) -> bool:  # the files video.frame_files reads
    return is_image_name(entry.name) and entry.is_file()


def _file_stamp(st) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def sample_stamp(image_path: str, video_path: str):
    """(digest, files, newest mtime_ns) of the size, mtime_ns, ctime_ns and inode of every file a
    sample's check reads: the image, then the clip file or each frame image of a frame folder
    (by name, names included, so an added, removed or renamed frame changes it too). The ctime
    and inode catch what size and mtime miss: a file replaced with its old mtime restored
    (`cp -p`, `touch -r`, an archive extracted again) and a permission fixed with chmod / chown
    after a check failed on it. None when a file cannot be stat-ed or the folder listed (the
    sample is then simply checked)."""
    try:
        img = os.stat(image_path)
        vid = os.stat(video_path)
        if not stat.S_ISREG(img.st_mode):
            return None
        if stat.S_ISDIR(vid.st_mode):
            with os.scandir(video_path) as entries:
                frames = sorted((e.name, e) for e in entries if _is_frame(e))
            stamps = [_file_stamp(img)]
            for name, e in frames:
                stamps.append((name, *_file_stamp(e.stat())))
            newest = max(img.st_mtime_ns, max((t[2] for t in stamps[1:]), default=0))
        elif stat.S_ISREG(vid.st_mode):
            stamps = [_file_stamp(img), _file_stamp(vid)]
            newest = max(img.st_mtime_ns, vid.st_mtime_ns)
        else:
            return None
    except OSError:
        return None
    # a digest, not the list: a frame folder has many files, and the manifest is read whole at
    # every start (10^4 clips x 16 frames: ~9 MB of JSON against ~2 MB)
    return hashlib.sha1(repr(stamps).encode("utf-8", "surrogateescape")).hexdigest(), len(stamps), newest


class Manifest:
    """The verdicts remembered for one split folder.

    lookup(image, video, stamp) -> the remembered verdict or None (stamp: `sample_stamp`'s);
    record(...) stores a fresh one; save() writes the file atomically (temp file + os.replace)
    when anything changed, and only warns when it cannot. A verdict is ("ok", frame_count) or ("bad", path, reason).
    """

    def __init__(self, split_dir):
        self._given = os.fspath(split_dir)  # the sample paths start with it: bad paths come back so
        self.split_dir = os.path.abspath(self._given)
        self.path = manifest_path(self.split_dir)
        self.decoders = _decoders()
        self._changed = False     # set by a fresh verdict, or by a manifest ignored on load
        self._old = self._load()  # (image_rel, video_rel) -> entry, from the file
        self._new = {}            # what this run keeps: the entries of the current samples

    def _key(self, image_path, video_path):
        return (_relative(image_path, self._given), _relative(video_path, self._given))

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError):
            return {}  # none yet (or no cache folder: save() says so)
        except (OSError, ValueError) as exc:
            self._ignore(f"cannot be read or parsed ({type(exc).__name__}: {exc})")
            return {}
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                self._ignore("is not a dtl_fast data manifest")
                return {}
            if isinstance(data.get("version"), int) and data["version"] < VERSION:
                return {}  # an older dtl_fast's verdicts: checked again, quietly, as for a decoder upgrade
            if data.get("version") != VERSION:
                self._ignore(f"has format version {data.get('version')!r}, this dtl_fast writes {VERSION}")
                return {}
            if data.get("root") != self.split_dir:
                self._ignore(f"belongs to another folder ({data.get('root')!r})")
                return {}
            if data.get("decoders") != self.decoders:
                return {}  # another Pillow / PyAV: what decodes may differ, so check again (quietly)
            entries = {}
            for e in data["samples"]:
                ok = e["verdict"] == "ok"
                if not (isinstance(e["image"], str) and isinstance(e["video"], str)
                        and isinstance(e["checked_ns"], int) and isinstance(e["stamp"], str)
                        and isinstance(e["files"], int) and isinstance(e["newest_ns"], int)
                        and (isinstance(e["frames"], int) and e["frames"] >= 1 if ok else
                             e["verdict"] == "bad" and isinstance(e["path"], str)
                             and isinstance(e["reason"], str))):
                    raise ValueError(f"malformed entry {e!r:.200}")
                entries[(e["image"], e["video"])] = e
            return entries
        except (KeyError, TypeError, ValueError) as exc:
            self._ignore(f"is corrupt ({type(exc).__name__}: {exc})")
            return {}

    def _ignore(self, why: str) -> None:
        self._changed = True  # rewritten with what this run finds
        warnings.warn(f"ignoring the data check manifest {self.path}: it {why}; every sample of "
                      f"{self.split_dir} is checked again and the manifest rewritten", stacklevel=6)

    def lookup(self, image_path, video_path, stamp):
        """The verdict remembered for this sample if its files are unchanged (same sizes, mtimes
        and frame names, none modified within RACY_NS before the check), else None."""
        if stamp is None:
            return None
        key = self._key(image_path, video_path)
        entry = self._old.get(key)
        if entry is None or entry["stamp"] != stamp[0]:
            return None
        if stamp[2] + RACY_NS > entry["checked_ns"]:
            return None  # written too close to its check: a same-stamp rewrite could hide
        self._new[key] = entry
        if entry["verdict"] == "ok":
            return ("ok", entry["frames"])
        return ("bad", os.path.join(self._given, entry["path"]), entry["reason"])

    def record(self, image_path, video_path, stamp, checked_ns: int, verdict) -> None:
        """Remembers a fresh verdict; stamp (taken before decoding) None: nothing to remember."""
        self._changed = True
        if stamp is None:
            return
        entry = {"image": None, "video": None, "stamp": stamp[0], "files": stamp[1], "newest_ns": stamp[2],
                 "checked_ns": int(checked_ns)}
        entry["image"], entry["video"] = self._key(image_path, video_path)
        if verdict[0] == "ok":
            entry.update(verdict="ok", frames=int(verdict[1]))
        else:
            entry.update(verdict="bad", path=_relative(verdict[1], self._given), reason=verdict[2])
        self._new[entry["image"], entry["video"]] = entry

    def save(self) -> None:
        """Writes the kept entries (current samples only) if anything changed since the load."""
        if not self._changed and len(self._new) == len(self._old):
            return
        data = {"format": FORMAT, "version": VERSION, "root": self.split_dir, "decoders": self.decoders,
                "written_ns": time.time_ns(),
                "samples": [self._new[k] for k in sorted(self._new)]}
        folder = os.path.dirname(self.path)
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
            tmp = None
        except OSError as exc:
            warnings.warn(f"could not write the data check manifest {self.path} ({exc}); the next run "
                          f"checks every sample of {self.split_dir} again (set DTL_FAST_CACHE to a "
                          "writable folder, or pass manifest=False)", stacklevel=4)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
