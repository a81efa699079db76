"""dtl_fast.data: what the data layer must never do (delete a user's files, invent a class) and
errors that must reach the user whole (a bad sample found in a DataLoader worker)."""
import json
import os
import pathlib
import pickle
import subprocess
import warnings

import pytest
import torch
from PIL import Image

from dtl_fast.data import BadSampleError, MultiModalFolder, build_demo_dataset, collate_multimodal
from dtl_fast.data import demo as demo_mod
from dtl_fast.data import prepared as P


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))


def _sample(split_dir, cls, stem, frames=2):
    folder = pathlib.Path(split_dir) / cls
    (folder / stem).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (10, 20, 30)).save(folder / f"{stem}.png")
    for k in range(frames):
        Image.new("L", (6, 6), 10 * k).save(folder / stem / f"{k}.png")
    return folder / stem


@pytest.fixture
def raw(tmp_path):
    """A raw user data set: 2 classes, train / validation / test."""
    root = tmp_path / "raw"
    for split in ("train", "validation", "test"):
        for cls in ("a", "b"):
            _sample(root / split, cls, f"{split}{cls}1")
            _sample(root / split, cls, f"{split}{cls}2", frames=3)
    return root


def _files(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


# ---------------------------------------------------------------------------- demo overwrite


def test_demo_overwrite_never_replaces_a_data_set_that_is_not_a_demo_build(raw):
    before = _files(raw)
    for overwrite in (True, False):  # --overwrite first: it used to delete the data set
        with pytest.raises(FileExistsError) as info:
            build_demo_dataset(raw, samples_per_class=3, overwrite=overwrite)
        msg = str(info.value)
        assert str(raw) in msg and "train/" in msg and "validation/" in msg, msg
        assert "--overwrite" not in msg and "overwrite=True" not in msg, msg
        assert _files(raw) == before, "a file of the user's data set was touched"
    # not a demo build either: a marker file of someone else, or a corrupt one
    (raw / demo_mod.MARKER).write_text('{"generator": "someone.else"}')
    with pytest.raises(FileExistsError, match="not a demo data set"):
        build_demo_dataset(raw, samples_per_class=3, overwrite=True)
    (raw / demo_mod.MARKER).write_text("{not json")
    with pytest.raises(FileExistsError, match="not a demo data set"):
        build_demo_dataset(raw, samples_per_class=3, overwrite=True)
    assert (raw / "train" / "a" / "traina1.png").is_file()
    assert not [p for p in raw.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_demo_overwrite_replaces_an_earlier_demo_build_or_an_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    build_demo_dataset(empty, samples_per_class=3, overwrite=True)
    assert demo_mod.is_demo_build(empty)
    build_demo_dataset(empty, samples_per_class=4, overwrite=True)  # other parameters
    assert len(MultiModalFolder(empty, "validation")) == 10
    assert not demo_mod.is_demo_build(tmp_path) and not demo_mod.is_demo_build(tmp_path / "nowhere")


def test_demo_replace_other_build_rebuilds_only_another_demo_build(tmp_path, monkeypatch):
    """What `dtl-fast train` without --data asks of its cache folder: a build with other
    parameters (here: another generator version) is rebuilt, a current one is left alone."""
    root = build_demo_dataset(tmp_path / "cache", samples_per_class=3)
    marker = root / demo_mod.MARKER
    marker.write_text(marker.read_text().replace(f'"version": {demo_mod.VERSION}', '"version": 0'))
    with pytest.raises(FileExistsError, match="other parameters"):
        build_demo_dataset(root, samples_per_class=3)
    build_demo_dataset(root, samples_per_class=3, replace_other_build=True)
    assert '"version": 0' not in marker.read_text()
    stamp = marker.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt although the build is current")

    monkeypatch.setattr(demo_mod, "render_demo_samples", boom)
    assert build_demo_dataset(root, samples_per_class=3, replace_other_build=True) == root
    assert marker.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # a folder that is not a demo build stays refused
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "train" / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a demo data set"):
        build_demo_dataset(tmp_path / "mine", samples_per_class=3, replace_other_build=True)
    assert (tmp_path / "mine" / "train" / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("how", ["overwrite", "replace_other_build"])
def test_demo_overwrite_never_deletes_what_a_user_added_inside_a_build(tmp_path, how):
    # The marker says "a demo build"; the split folders must say so too: a user's own sample or
    # class folder inside a build, or a forged marker next to a user's data set, is refused and
    # kept (the overwrite would rmtree the whole tree).
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    kw = {how: True}
    stem = sorted(p.stem for p in (root / "train" / "3").glob("*.png"))[0]
    added = [root / "train" / "7" / "my_own_sample.png", root / "validation" / "mycls" / "a.png",
             root / "test" / "2" / "9999.png"]  # demo naming, but a sample the build did not write
    for path in added:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
        (path.parent / path.stem).mkdir(exist_ok=True)
        with pytest.raises(FileExistsError, match="did not write"):
            build_demo_dataset(root, samples_per_class=4, **kw)
        assert path.read_bytes() == b"mine"
        path.unlink()
        (path.parent / path.stem).rmdir()
    (root / "validation" / "mycls").rmdir()
    (root / "train" / "3" / stem / "notes.txt").write_text("mine")  # inside a clip's frames
    with pytest.raises(FileExistsError, match="did not write"):
        build_demo_dataset(root, samples_per_class=4, **kw)
    (root / "train" / "3" / stem / "notes.txt").unlink()
    build_demo_dataset(root, samples_per_class=4, **kw)  # exactly a build: replaced
    assert len(MultiModalFolder(root, "validation")) == 10
    forged = tmp_path / "mine"
    (forged / "train" / "cat").mkdir(parents=True)
    (forged / "train" / "cat" / "a.jpg").write_bytes(b"mine")
    (forged / demo_mod.MARKER).write_text('{"generator": "%s"}' % demo_mod.GENERATOR)
    with pytest.raises(FileExistsError, match="did not write"):
        build_demo_dataset(forged, samples_per_class=3, **kw)
    assert (forged / "train" / "cat" / "a.jpg").read_bytes() == b"mine"
    # ... even when the user's tree looks like a build's (digit classes, <stem>.png + frames)
    (forged / "train" / "cat").rename(forged / "train" / "0")
    (forged / "train" / "0" / "a.jpg").rename(forged / "train" / "0" / "0001.png")
    (forged / "train" / "0" / "0001").mkdir()
    with pytest.raises(FileExistsError, match="no sample counts"):
        build_demo_dataset(forged, samples_per_class=3, **kw)
    assert (forged / "train" / "0" / "0001.png").read_bytes() == b"mine"
    # ... and when the forged marker has counts that are not a build's (empty, or not per digit)
    for counts in ({}, {"train": {}}, {s: {"0": 1} for s in ("train", "validation", "test")}):
        (forged / demo_mod.MARKER).write_text(json.dumps({"generator": demo_mod.GENERATOR, "counts": counts}))
        with pytest.raises(FileExistsError, match="no sample counts"):
            build_demo_dataset(forged, samples_per_class=3, **kw)
        assert (forged / "train" / "0" / "0001.png").read_bytes() == b"mine"


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_demo_overwrite_through_a_symlink_rebuilds_the_target_and_keeps_the_link(tmp_path):
    """DIR a symbolic link to an earlier demo build: the build in the link's target is
    replaced, the link stays a link to it, nothing is left beside either (it used to replace the
    link by a real folder and leave a `.link.old-*` link behind)."""
    real = build_demo_dataset(tmp_path / "real", samples_per_class=3)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert build_demo_dataset(link, samples_per_class=4, overwrite=True) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads((real / demo_mod.MARKER).read_text())["parameters"]["samples_per_class"] == 4
    assert len(MultiModalFolder(link, "validation")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"], "a leftover"
    assert build_demo_dataset(link, samples_per_class=4) == link  # current: a no-op
    # the guards judge the link's target: a user's data set behind a link is refused, named
    mine = tmp_path / "mine"
    (mine / "train" / "cats").mkdir(parents=True)
    (mine / "train" / "cats" / "1.png").write_bytes(b"precious")
    to_mine = tmp_path / "to_mine"
    to_mine.symlink_to(mine, target_is_directory=True)
    for kw in ({"overwrite": True}, {"replace_other_build": True}, {}):
        with pytest.raises(FileExistsError, match="not a demo data set") as info:
            build_demo_dataset(to_mine, samples_per_class=3, **kw)
        assert f"{to_mine} (a symbolic link to {mine})" in str(info.value)
        assert to_mine.is_symlink() and (mine / "train" / "cats" / "1.png").read_bytes() == b"precious"
    # a link to a folder not made yet: built there, the link kept
    to_new = tmp_path / "to_new"
    to_new.symlink_to(tmp_path / "new", target_is_directory=True)
    build_demo_dataset(to_new, samples_per_class=3)
    assert to_new.is_symlink() and demo_mod.is_demo_build(tmp_path / "new")
    # a link into a folder that is not there (a drive not mounted): refused, nothing created
    nowhere = tmp_path / "to_nowhere"
    nowhere.symlink_to(tmp_path / "unmounted" / "demo", target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        build_demo_dataset(nowhere, samples_per_class=3)
    assert str(nowhere) in str(info.value) and not (tmp_path / "unmounted").exists()
    # a link left aside by the old code is tidied by the next build (the link only)
    left = tmp_path / f".real.old-{_dead_pid()}-0"
    left.symlink_to(real, target_is_directory=True)
    build_demo_dataset(link, samples_per_class=3, overwrite=True)
    assert not os.path.lexists(left) and demo_mod.is_demo_build(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine", "new", "real", "to_mine",
                                                           "to_new", "to_nowhere"]


def test_demo_stopped_between_its_two_renames_puts_the_earlier_build_back(tmp_path, monkeypatch):
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    real_rename = os.rename

    def stopped(src, dst):
        if ".building-" in str(src):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(demo_mod.os, "rename", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(root, samples_per_class=4, overwrite=True)
    monkeypatch.undo()
    assert json.loads((root / demo_mod.MARKER).read_text())["parameters"]["samples_per_class"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "a leftover"


def test_the_current_folder_is_refused_as_demo_root_or_prepare_out(raw, tmp_path, monkeypatch):
    """Building renames a new folder into DIR's / OUT's place: with DIR = '.' that used to fail
    with "[Errno 16] Device or resource busy" (or would leave a shell in a deleted folder)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(FileExistsError, match="current folder"):
        build_demo_dataset(".", samples_per_class=3)
    with pytest.raises(FileExistsError, match="current folder"):
        P.prepare(raw, ".", image_size=8, max_frames=2, progress=False)
    (here / "sub").mkdir()
    monkeypatch.chdir(here / "sub")  # inside it
    with pytest.raises(FileExistsError, match="current folder or holds it"):
        build_demo_dataset(here, samples_per_class=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "raw"]
    assert [p.name for p in here.iterdir()] == ["sub"]


# ---------------------------------------------------------------------------- prepare overwrite


def test_prepare_overwrite_refuses_user_files_inside_the_split_folders(raw, tmp_path):
    out = tmp_path / "prep"
    P.prepare(raw, out, image_size=8, max_frames=2, progress=False)
    (out / "train" / "NOTES.txt").write_text("mine")
    (out / "validation" / "mystuff").mkdir()
    (out / "validation" / "mystuff" / "x").write_text("keep")
    with pytest.raises(FileExistsError) as info:
        P.prepare(raw, out, image_size=8, max_frames=2, overwrite=True, progress=False)
    msg = str(info.value)
    assert str(out) in msg and "train/NOTES.txt" in msg and "validation/mystuff/" in msg, msg
    assert (out / "train" / "NOTES.txt").read_text() == "mine"
    assert (out / "validation" / "mystuff" / "x").read_text() == "keep"
    # what a prepare wrote, and only that, is replaced
    (out / "train" / "NOTES.txt").unlink()
    (out / "validation" / "mystuff" / "x").unlink()
    (out / "validation" / "mystuff").rmdir()
    P.prepare(raw, out, image_size=10, max_frames=2, overwrite=True, progress=False)
    assert P.read_manifest(out)["image_size"] == [10, 10]


def test_prepare_overwrite_refuses_a_users_own_prepared_json(raw, tmp_path):
    """A file called prepared.json does not make a folder an earlier prepare's output: it used
    to be replaced with --overwrite when it held nothing else."""
    out = tmp_path / "prep"
    P.prepare(raw, out, image_size=8, max_frames=2, progress=False)
    written = (out / P.MANIFEST).read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    cases = {
        '{"my": "notes"}': 'no "format" field',
        '["a", "list"]': "a JSON list",
        '{"format": "my.tool"}': "'my.tool'",
        "not json {": "not JSON",
        written: "no split folder with the arrays",  # a copied manifest with nothing beside it
    }
    for text, why in cases.items():
        (mine / P.MANIFEST).write_text(text)
        for overwrite in (True, False):
            with pytest.raises(FileExistsError, match="refusing to write into OUT") as info:
                P.prepare(raw, mine, image_size=8, max_frames=2, overwrite=overwrite, progress=False)
            msg = str(info.value)
            assert str(mine / P.MANIFEST) in msg and why in msg and "--overwrite" not in msg, msg
            assert (mine / P.MANIFEST).read_text() == text
    # ... nor with a split folder of the user's own beside it
    (mine / "train").mkdir()
    (mine / "train" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="no split folder with the arrays"):
        P.prepare(raw, mine, image_size=8, max_frames=2, overwrite=True, progress=False)
    assert (mine / "train" / "notes.txt").read_text() == "keep"
    # a split folder that is a link is not prepare's either (its target is kept)
    (out / "test").rename(tmp_path / "elsewhere")
    (out / "test").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(FileExistsError, match="besides a prepared data set it holds test/"):
        P.prepare(raw, out, image_size=8, max_frames=2, overwrite=True, progress=False)
    (out / "test").unlink()
    (tmp_path / "elsewhere").rename(out / "test")
    # an earlier output of another format version is prepare's: replaced with --overwrite
    m = json.loads(written)
    m["version"] = P.VERSION + 1
    (out / P.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(P.PreparedDataError, match="--overwrite"):
        P.read_manifest(out)
    P.prepare(raw, out, image_size=10, max_frames=2, overwrite=True, progress=False)
    assert P.read_manifest(out)["image_size"] == [10, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "prep", "raw"]


def test_a_raw_folder_holding_a_file_called_prepared_json_is_named(raw, tmp_path):
    (raw / P.MANIFEST).write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="holds prepared.json but is not a prepared data set") as info:
        P.prepare(raw, tmp_path / "out", image_size=8, max_frames=2, progress=False)
    assert str(raw / P.MANIFEST) in str(info.value) and "rename" in str(info.value)
    with pytest.raises(P.PreparedDataError, match="rename that file") as info:
        P.open_split(raw, "train", image_size=8, max_frames=2)
    assert "--overwrite" not in str(info.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- class folders


def test_an_empty_class_folder_is_an_error_naming_it(raw):
    (raw / "train" / "zz").mkdir()
    with pytest.raises(ValueError, match="no samples in the class folder") as info:
        MultiModalFolder(raw, "train")
    assert str(raw / "train" / "zz") in str(info.value) and "remove" in str(info.value)
    # a visible folder holding only files that are not samples is no class either
    (raw / "train" / "zz" / "readme.txt").write_text("x")
    (raw / "train" / "zz" / "._a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="zz"):
        MultiModalFolder(raw, "train")
    (raw / "validation" / "zz").mkdir()
    with pytest.raises(ValueError, match="zz"):
        MultiModalFolder(raw, "validation")  # it would define a class
    with pytest.raises(ValueError, match=r"\['zz'\].*not in classes"):
        MultiModalFolder(raw, "validation", classes=["a", "b"])
    # with the class list given (train's), an empty folder of a known class is just no sample of it
    ds = MultiModalFolder(raw, "validation", classes=["a", "b", "zz"])
    assert ds.classes == ["a", "b", "zz"] and len(ds) == 4


def test_prepare_without_train_takes_the_classes_of_every_split_together(tmp_path):
    """A set to evaluate on (validation/ and test/, no train/): the classes are the splits'
    class folders together, so a class folder that is empty in one split, or missing from one,
    is fine (it used to fail on validation's empty folder, and on a test class validation
    lacked); a class with no sample in any split is an error naming its folders."""
    root = tmp_path / "raw"
    for split in ("validation", "test"):
        for cls in ("a", "b"):
            _sample(root / split, cls, f"{split}{cls}")
    (root / "validation" / "c").mkdir()  # empty here ...
    _sample(root / "test", "c", "testc")  # ... with a sample in test
    _sample(root / "validation", "d", "validationd")  # no test/d folder at all
    out = tmp_path / "prep"
    m = P.prepare(root, out, image_size=8, max_frames=2, progress=False)
    assert m["classes"] == ["a", "b", "c", "d"]
    assert m["splits"]["validation"]["class_folders"] == ["a", "b", "c", "d"]
    assert m["splits"]["test"]["class_folders"] == ["a", "b", "c"]
    val = P.open_split(out, "validation", classes=m["classes"], image_size=8, max_frames=2)
    test = P.open_split(out, "test", classes=m["classes"], image_size=8, max_frames=2)
    assert [s[2] for s in val.samples] == [0, 1, 3] and [s[2] for s in test.samples] == [0, 1, 2]
    # a class no split has a sample of
    (root / "validation" / "e").mkdir()
    (root / "test" / "e").mkdir()
    (root / "test" / "e" / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no samples in the class folders") as info:
        P.prepare(root, tmp_path / "prep2", image_size=8, max_frames=2, progress=False)
    msg = str(info.value)
    assert str(root / "validation" / "e") in msg and str(root / "test" / "e") in msg, msg
    assert "no train/ split" in msg and "class 'e' has no sample" in msg and "remove" in msg, msg
    assert not (tmp_path / "prep2").exists()
    # with train/, train's class folders stay the classes (an empty one is an error) ...
    for cls in ("a", "b", "c", "d"):
        _sample(root / "train", cls, f"train{cls}")
    (root / "train" / "e").mkdir()
    with pytest.raises(ValueError, match=f"no samples in the class folder {root / 'train' / 'e'}:"):
        P.prepare(root, tmp_path / "prep2", image_size=8, max_frames=2, progress=False)
    # ... and another split's empty folder of one of them is a class with no sample there
    (root / "train" / "e").rmdir()
    (root / "validation" / "e").rmdir()
    import shutil
    shutil.rmtree(root / "test" / "e")
    m = P.prepare(root, tmp_path / "prep2", image_size=8, max_frames=2, progress=False)
    assert m["classes"] == ["a", "b", "c", "d"]


def test_hidden_and_macosx_folders_are_not_classes(raw, tmp_path):
    for junk in ("__MACOSX", ".Trashes"):
        (raw / "train" / junk / "a").mkdir(parents=True)
        (raw / "train" / junk / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = MultiModalFolder(raw, "train")
    assert ds.classes == ["a", "b"] and len(ds) == 4
    # and a prepared set lists the same class folders
    out = tmp_path / "prep"
    P.prepare(raw, out, image_size=8, max_frames=2, progress=False)
    assert P.read_manifest(out)["splits"]["train"]["class_folders"] == ["a", "b"]


def test_a_class_whose_every_sample_is_skipped_warns_naming_it(raw):
    for png in (raw / "train" / "b").glob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = MultiModalFolder(raw, "train", on_bad_sample="skip")
    text = "\n".join(str(w.message) for w in record)
    assert "skipped 2 bad sample" in text and str(raw / "train" / "b") + " is bad" in text, text
    assert ds.classes == ["a", "b"] and len(ds) == 2 and len(ds.skipped) == 2


# ---------------------------------------------------------------------------- worker re-raise


def test_bad_sample_error_keeps_bad_and_where_and_pickles():
    exc = BadSampleError([("/d/train/k/x.png", "corrupt: no IDAT"), (pathlib.Path("/d/y"), "gone")],
                         "/d/train")
    assert exc.bad == [("/d/train/k/x.png", "corrupt: no IDAT"), ("/d/y", "gone")]
    assert exc.where == "/d/train" and isinstance(exc, RuntimeError)
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc) and again.bad == exc.bad and again.where == exc.where
    # rebuilt from its own message (what a re-raise that only has the text does)
    text = BadSampleError(str(exc))
    assert str(text) == str(exc) and text.bad == exc.bad and text.where == exc.where


def test_bad_sample_error_survives_a_dataloader_worker(raw):
    """A file that goes bad after the check, read in a DataLoader worker process: the main
    process gets a BadSampleError (the CLI's clean exit 2), not PyTorch's RuntimeError."""
    ds = MultiModalFolder(raw, "train")
    gone = pathlib.Path(ds.samples[1][1])
    for frame in gone.iterdir():
        frame.unlink()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1,
                                         collate_fn=collate_multimodal)
    with pytest.raises(BadSampleError) as info:
        list(loader)
    exc = info.value
    assert type(exc) is BadSampleError
    msg = str(exc)
    assert msg.startswith("1 bad sample in ") and "Traceback" not in msg, msg
    assert exc.where == str(raw / "train")
    assert len(exc.bad) == 1 and exc.bad[0][0] == str(gone) and "no frame images" in exc.bad[0][1]
    assert "DataLoader worker process 0" in exc.worker_traceback
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == msg and again.bad == exc.bad
