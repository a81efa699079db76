"""Checking a data set at scale: worker processes, the progress bar, and the manifest that lets
an unchanged data set skip decoding (counted by wrapping check_image / check_video)."""
import json
import os
import pathlib
import stat
import threading
import time
import warnings

import pytest
from PIL import Image

from dtl_fast.data import BadSampleError, MultiModalFolder
from dtl_fast.data import folder as folder_mod
from dtl_fast.data import manifest as manifest_mod

HOUR_NS = 3600 * 10**9


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Manifests go to a folder of this test, not to ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DTL_FAST_CACHE", str(path))
    return path


def _png(path, value, mode="L", size=(4, 4)):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _sample(root, cls, stem, frames=3):
    _png(root / "train" / cls / f"{stem}.png", (1, 2, 3), mode="RGB")
    for k in range(frames):
        _png(root / "train" / cls / stem / f"{k}.png", 10 * k)


def _age(root, ns=HOUR_NS):
    """Sets every file's mtime `ns` into the past: files written long before a check are trusted
    by the manifest (fresh ones are re-checked, see test_fresh_files_are_checked_again)."""
    past = time.time_ns() - ns
    root = pathlib.Path(root)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_file():
            os.utime(p, ns=(past, past))


def _touch(path, ns):
    os.utime(path, ns=(ns, ns))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "set"
    _sample(root, "cat", "a", frames=2)
    _sample(root, "cat", "b", frames=4)
    _sample(root, "dog", "c", frames=3)
    _png(root / "train" / "dog" / "lonely.png", (5, 5, 5), mode="RGB")  # a bad sample: no video
    _age(root)
    return root


class Counter:
    """Wraps folder.check_image / check_video and records every path decoded (threads only:
    worker processes would count in their own memory)."""

    def __init__(self, monkeypatch):
        self.paths = []
        self._lock = threading.Lock()
        for name in ("check_image", "check_video"):
            real = getattr(folder_mod, name)
            monkeypatch.setattr(folder_mod, name, self._wrap(real))

    def _wrap(self, real):
        def counted(path):
            with self._lock:
                self.paths.append(os.path.basename(os.fspath(path)))
            return real(path)
        return counted

    def take(self):
        out, self.paths = sorted(self.paths), []
        return out


def _result(ds):
    return ds.classes, ds.samples, ds.num_frames, ds.skipped


def _build(root, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MultiModalFolder: skipped")
        return MultiModalFolder(root, on_bad_sample="skip", **kw)


def _entries(root):
    data = json.loads(pathlib.Path(manifest_mod.manifest_path(root / "train")).read_text())
    return {(e["image"], e["video"]): e for e in data["samples"]}


# ---------------------------------------------------------------------------- the manifest


def test_second_construction_decodes_nothing_and_gives_the_same_result(data, monkeypatch, cache):
    counter = Counter(monkeypatch)
    first = _build(data)
    assert counter.take() == ["a", "a.png", "b", "b.png", "c", "c.png"]
    path = pathlib.Path(manifest_mod.manifest_path(data / "train"))
    assert path.parent == cache / "manifests" and path.is_file()
    second = _build(data)
    assert counter.take() == []
    assert _result(second) == _result(first)
    assert second.num_frames == [2, 4, 3] and second.skipped[0][0].endswith("lonely.png")
    without = _build(data, manifest=False)
    assert counter.take() == ["a", "a.png", "b", "b.png", "c", "c.png"]
    assert _result(without) == _result(first)
    e = _entries(data)
    assert sorted(e) == [("cat/a.png", "cat/a"), ("cat/b.png", "cat/b"), ("dog/c.png", "dog/c")]
    assert e[("cat/b.png", "cat/b")]["frames"] == 4 and e[("cat/b.png", "cat/b")]["verdict"] == "ok"
    a = e[("cat/a.png", "cat/a")]
    assert a["files"] == 3  # the image and two frames
    assert a["newest_ns"] == max(p.stat().st_mtime_ns for p in (data / "train" / "cat").rglob("a*") if p.is_file())
    assert a["checked_ns"] > a["newest_ns"] and len(a["stamp"]) == 40
    assert json.loads(path.read_text())["root"] == str(data / "train")


def test_a_changed_added_or_removed_file_is_checked_again(data, monkeypatch):
    counter = Counter(monkeypatch)
    _build(data)
    counter.take()
    now = time.time_ns() - HOUR_NS // 2  # older than the racy window, newer than _age
    _touch(data / "train" / "cat" / "b" / "3.png", now)  # one frame of b
    _touch(data / "train" / "dog" / "c.png", now)        # the image of c
    ds = _build(data)
    assert counter.take() == ["b", "b.png", "c", "c.png"]
    assert ds.num_frames == [2, 4, 3]
    _png(data / "train" / "cat" / "a" / "9.png", 90)     # a frame added to a
    os.remove(data / "train" / "cat" / "b" / "3.png")    # a frame removed from b
    _sample(data, "dog", "d", frames=1)                  # a new sample
    _age(data / "train" / "cat" / "a" / "9.png")
    _age(data / "train" / "dog" / "d")
    _age(data / "train" / "dog" / "d.png")
    ds = _build(data)
    assert counter.take() == ["a", "a.png", "b", "b.png", "d", "d.png"]
    assert ds.num_frames == [3, 3, 3, 1]
    assert _build(data).num_frames == [3, 3, 3, 1] and counter.take() == []
    os.remove(data / "train" / "dog" / "d.png")
    _build(data)
    assert counter.take() == []
    assert ("dog/d.png", "dog/d") not in _entries(data)  # a removed sample leaves the manifest


def test_the_manifest_never_hides_a_file_that_went_bad(data, monkeypatch):
    _build(data)
    frame = data / "train" / "cat" / "a" / "1.png"
    old = frame.stat()
    frame.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (old.st_size - 8))  # same size, garbage
    _touch(frame, old.st_mtime_ns + 10**9)                                # a second later
    with pytest.raises(BadSampleError, match="1.png") as info:
        MultiModalFolder(data)
    assert {p for p, _ in info.value.bad} == {str(frame), str(data / "train" / "dog" / "lonely.png")}
    # the bad verdict is remembered too: the next run reports it without decoding anything
    counter = Counter(monkeypatch)
    with pytest.raises(BadSampleError) as again:
        MultiModalFolder(data)
    assert counter.take() == [] and again.value.bad == info.value.bad
    assert _entries(data)[("cat/a.png", "cat/a")]["verdict"] == "bad"
    # and the repaired file is trusted again only after it is checked
    _png(frame, 10)
    _touch(frame, old.st_mtime_ns + 2 * 10**9)
    assert _build(data).num_frames == [2, 4, 3] and counter.take() == ["a", "a.png"]


def test_fresh_files_are_checked_again(tmp_path, monkeypatch):
    """A file written within RACY_NS of its check may be rewritten later in the same timestamp
    tick (same size, same mtime): its verdict is not trusted until a check that comes later."""
    root = tmp_path / "set"
    _sample(root, "k", "a")
    _sample(root, "k", "b")
    _age(root / "train" / "k" / "b")
    _age(root / "train" / "k" / "b.png")
    counter = Counter(monkeypatch)
    MultiModalFolder(root)
    assert counter.take() == ["a", "a.png", "b", "b.png"]
    MultiModalFolder(root)
    assert counter.take() == ["a", "a.png"]  # a's files were seconds old at its check: again
    monkeypatch.setattr(manifest_mod, "RACY_NS", 0)  # the same verdicts, without the 2 s window
    MultiModalFolder(root)
    assert counter.take() == []


def test_read_only_data_folder(data, monkeypatch, cache):
    before = sorted(str(p) for p in data.rglob("*"))
    modes = {}
    for p in [data, *data.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        first = _build(data)
        counter = Counter(monkeypatch)
        assert _result(_build(data)) == _result(first) and counter.take() == []
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert sorted(str(p) for p in data.rglob("*")) == before  # nothing written next to the data
    assert len(list((cache / "manifests").glob("*.json"))) == 1


def test_an_unwritable_cache_only_warns(data, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DTL_FAST_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the data check manifest"):
        ds = _build(data)
    assert ds.num_frames == [2, 4, 3]
    assert blocker.read_text() == "a file where the cache folder should be"


@pytest.mark.parametrize("damage", ["not json", "truncated", "wrong types", "another format", "other version",
                                    "another folder"])
def test_a_corrupt_or_foreign_manifest_is_ignored_and_rewritten(data, monkeypatch, damage, tmp_path):
    first = _build(data)
    path = pathlib.Path(manifest_mod.manifest_path(data / "train"))
    text = path.read_text()
    doc = json.loads(text)
    if damage == "not json":
        path.write_bytes(b"\x00\xff garbage")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "wrong types":
        doc["samples"][0]["frames"] = "many"
        path.write_text(json.dumps(doc))
    elif damage == "another format":
        doc["format"] = "something else"
        path.write_text(json.dumps(doc))
    elif damage == "other version":
        doc["version"] = manifest_mod.VERSION + 1
        path.write_text(json.dumps(doc))
    else:  # a manifest written for another folder (copied, or a hash collision) says all is well
        other = tmp_path / "other"
        _sample(other, "cat", "a", frames=7)
        _age(other)
        _build(other)
        foreign = json.loads(pathlib.Path(manifest_mod.manifest_path(other / "train")).read_text())
        for e in foreign["samples"]:
            e.update({k: _entries(data)[(e["image"], e["video"])][k] for k in ("stamp", "files", "newest_ns")})
        path.write_text(json.dumps(foreign))
    counter = Counter(monkeypatch)
    with pytest.warns(UserWarning, match="ignoring the data check manifest"):
        again = _build(data)
    assert counter.take() == ["a", "a.png", "b", "b.png", "c", "c.png"]
    assert _result(again) == _result(first)
    assert json.loads(path.read_text())["root"] == str(data / "train")  # rewritten, valid
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="MultiModalFolder: skipped")
        _build(data)
    assert counter.take() == []


def test_other_decoder_versions_check_again_quietly(data, monkeypatch):
    _build(data)
    monkeypatch.setattr(manifest_mod, "_decoders", lambda: {"pillow": "0.0", "av": None})
    counter = Counter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="MultiModalFolder: skipped")
        _build(data)
    assert counter.take() == ["a", "a.png", "b", "b.png", "c", "c.png"]


def test_manifest_false_writes_nothing(data, cache):
    _build(data, manifest=False)
    assert not cache.exists()


def test_an_interrupted_check_keeps_what_it_finished(tmp_path, monkeypatch):
    root = tmp_path / "set"
    for i in range(6):
        _sample(root, "k", f"s{i}", frames=1)
    _age(root)
    real = folder_mod.check_video
    calls = []

    def dies(path):
        calls.append(path)
        if os.path.basename(path) == "s3":
            raise RuntimeError("stand-in for a missing optional dependency")
        return real(path)

    monkeypatch.setattr(folder_mod, "check_video", dies)
    with pytest.raises(RuntimeError, match="stand-in"):
        MultiModalFolder(root)  # 6 samples: one thread, so s0..s2 finish first
    monkeypatch.setattr(folder_mod, "check_video", real)
    counter = Counter(monkeypatch)
    assert len(MultiModalFolder(root)) == 6
    assert counter.take() == ["s3", "s3.png", "s4", "s4.png", "s5", "s5.png"]


# ---------------------------------------------------------------------------- workers, progress


def test_worker_processes_give_the_same_result(data):
    _png(data / "train" / "cat" / "x.png", (1, 1, 1), mode="RGB")
    (data / "train" / "cat" / "x").mkdir()
    (data / "train" / "cat" / "x" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # bad frame
    threads = _build(data, workers=0, manifest=False)
    procs = _build(data, workers=2, manifest=False)
    assert _result(procs) == _result(threads)
    assert [p for p, _ in procs.skipped] == [str(data / "train" / "cat" / "x" / "0.png"),
                                             str(data / "train" / "dog" / "lonely.png")]
    many = _build(data, workers=7)  # more workers than samples
    assert _result(many) == _result(threads)
    with pytest.raises(BadSampleError, match="0.png"):
        MultiModalFolder(data, workers=2, manifest=False)


def test_progress_bar_on_stderr(data, capfd):
    _build(data, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "checking" in err and str(data / "train") in err and "3/3" in err  # 3 pairs to decode
    assert "\r" not in err  # not a terminal: whole lines (a log), not carriage-return redraws
    _build(data, progress=True)  # every sample from the manifest: a finished bar, no decoding
    _, err = capfd.readouterr()
    assert "3/3" in err
    _build(data)
    assert capfd.readouterr() == ("", "")  # quiet by default


@pytest.mark.parametrize("kwargs, name", [
    (dict(workers=-1), "workers"), (dict(workers=True), "workers"), (dict(workers=1.5), "workers"),
    (dict(workers="2"), "workers"), (dict(progress="yes"), "progress"), (dict(progress=1), "progress"),
    (dict(manifest=None), "manifest"), (dict(manifest="/tmp/x"), "manifest"),
])
def test_argument_errors_name_the_argument(data, kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiModalFolder(data, **kwargs)


def test_open_split_forwards_workers_and_progress(data, capfd):
    from dtl_fast.data import open_split

    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = open_split(data, "train", workers=2, progress=True, on_bad_sample="skip", image_size=8)
    assert ds.num_frames == [2, 4, 3] and ds.image_size == (8, 8)
    assert "checking" in capfd.readouterr().err


def test_threaded_stamps_match_serial_and_see_every_change(data):
    candidates = _build(data, manifest=False).samples
    serial = [manifest_mod.sample_stamp(i, v) for i, v, _ in candidates]
    assert folder_mod._stamp_all(candidates, chunk=1) == serial  # 3 chunks in threads
    assert [s[1] for s in serial] == [3, 5, 4]  # image + frames
    frame = data / "train" / "cat" / "b" / "1.png"
    for change in ("mtime", "mtime restored", "size", "rename"):
        before = manifest_mod.sample_stamp(*candidates[1][:2])
        assert manifest_mod.sample_stamp(*candidates[1][:2]) == before  # nothing changed yet
        st = frame.stat()
        if change == "size":
            frame.write_bytes(frame.read_bytes() + b"\0")
            _touch(frame, st.st_mtime_ns)  # the same mtime: size (and ctime) tell
        elif change == "mtime":
            _png(frame, 10)
            _touch(frame, st.st_mtime_ns + 1)  # the same size, one nanosecond later
            assert frame.stat().st_size == st.st_size
        elif change == "mtime restored":
            time.sleep(0.01)  # ctime moves on (its clock ticks at least this fine here)
            _png(frame, 20)
            _touch(frame, st.st_mtime_ns)  # same size, old mtime (`cp -p`, `touch -r`): ctime tells
            assert (frame.stat().st_size, frame.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        else:
            frame.rename(frame.with_name("1b.png"))  # same order, size and mtime: the name tells
        assert manifest_mod.sample_stamp(*candidates[1][:2])[0] != before[0], change
