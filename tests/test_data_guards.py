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
        P.prepare(raw, here, image_size=8, max_frames=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "raw"]
    assert [p.name for p in here.iterdir()] == ["sub"]
    built = build_demo_dataset(tmp_path / "built", samples_per_class=3)
    monkeypatch.chdir(built / "train" / "3")  # deep inside a build to be replaced
    with pytest.raises(FileExistsError, match="current folder or holds it") as info:
        build_demo_dataset(built, samples_per_class=4, overwrite=True)
    assert f"cd {tmp_path} first" in str(info.value)  # not "cd ..": that is still inside it
    assert demo_mod.is_demo_build(built)


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


# ---------------------------------------------------------------------------- s28 review: OUT / DIR


OPTS = dict(image_size=8, max_frames=2, progress=False)


def _siblings(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


def test_prepare_overwrite_refuses_a_manifest_beside_a_users_own_arrays(raw, tmp_path):
    """A prepared.json with the right "format" made a folder an earlier output as long as one
    split folder held a file named like prepare's arrays: --overwrite then deleted a user's own
    `train/images.npy` + `train/labels.npy`. The manifest must now be one prepare wrote and the
    files beside it must be the ones it records (size, dtype and shape)."""
    import numpy as np

    out = tmp_path / "prep"
    P.prepare(raw, out, **OPTS)
    written = json.loads((out / P.MANIFEST).read_text())
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    np.save(mine / "train" / "images.npy", np.arange(5))
    np.save(mine / "train" / "labels.npy", np.arange(5))
    before = {p: p.read_bytes() for p in (mine / "train").iterdir()}
    other = dict(written, version=P.VERSION + 1)  # another version's output, not this one's files
    lacking = {k: v for k, v in written.items() if k != "classes"}
    cases = {
        json.dumps({"format": P.FORMAT}): "\"splits\" is not a record",
        json.dumps({"format": P.FORMAT, "version": P.VERSION}): "it lacks",
        json.dumps({"format": P.FORMAT, "version": P.VERSION + 1}): '"splits"',
        json.dumps(lacking): "it lacks ['classes']",
        json.dumps(written): "does not describe the files beside it",
        json.dumps(other): "does not describe the files beside it",
    }
    for text, why in cases.items():
        (mine / P.MANIFEST).write_text(text)
        for overwrite in (True, False):
            with pytest.raises(FileExistsError, match="refusing to write into OUT") as info:
                P.prepare(raw, mine, overwrite=overwrite, **OPTS)
            msg = str(info.value)
            assert why in msg and str(mine / P.MANIFEST) in msg, msg
            assert "--overwrite" not in msg and "overwrite=True" not in msg, msg
            assert {p: p.read_bytes() for p in (mine / "train").iterdir()} == before
            assert (mine / P.MANIFEST).read_text() == text
    # an earlier output whose array was truncated or replaced is not replaced either
    images = out / "train" / "images.npy"
    keep = images.read_bytes()
    images.write_bytes(keep[:-10])
    with pytest.raises(FileExistsError, match=r"train/images.npy is \d+ bytes"):
        P.prepare(raw, out, overwrite=True, **OPTS)
    np.save(images, np.zeros(4 * 8 * 8 * 3 // 4, np.float32))  # the same size, another array
    assert len(images.read_bytes()) == len(keep)
    with pytest.raises(FileExistsError, match=r"train/images.npy holds float32 \[192\]"):
        P.prepare(raw, out, overwrite=True, **OPTS)
    images.write_bytes(keep)
    P.prepare(raw, out, overwrite=True, image_size=10, max_frames=2, progress=False)  # intact: replaced
    assert P.read_manifest(out)["image_size"] == [10, 10]
    assert _siblings(tmp_path) == ["mine", "prep", "raw"]


def test_overwrite_is_suggested_only_where_it_would_not_be_refused(raw, tmp_path):
    """Without --overwrite, an earlier output (or demo build) holding a user's file used to be
    answered "pass --overwrite", which then refused: the refusal comes first now."""
    out = tmp_path / "prep"
    P.prepare(raw, out, **OPTS)
    (out / "train" / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="besides a prepared data set it holds train/NOTES.txt") as info:
        P.prepare(raw, out, **OPTS)
    assert "--overwrite" not in str(info.value)
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    (root / "train" / "3" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write") as info:
        build_demo_dataset(root, samples_per_class=4)
    assert "--overwrite" not in str(info.value)
    assert (out / "train" / "NOTES.txt").read_text() == "mine"
    assert (root / "train" / "3" / "mine.txt").read_text() == "mine"


def test_what_is_written_into_out_while_prepare_runs_is_kept(raw, tmp_path, monkeypatch):
    """OUT was checked before decoding and replaced after it (hours later on a large set):
    whatever had been saved into it by then was deleted. The check runs again just before the
    rename; the run is refused and its output kept beside OUT."""
    real = P._prepare_split
    out = tmp_path / "out"
    out.mkdir()

    def user_saves(ds, tmp, split, *a, **k):
        if split == "train":
            (out / "my_notes.txt").write_text("precious")
        return real(ds, tmp, split, *a, **k)

    monkeypatch.setattr(P, "_prepare_split", user_saves)
    with pytest.raises(FileExistsError, match="checked again") as info:
        P.prepare(raw, out, **OPTS)  # an empty OUT, no --overwrite
    monkeypatch.undo()
    assert (out / "my_notes.txt").read_text() == "precious" and _siblings(out) == ["my_notes.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and str(kept[0]) in str(info.value), str(info.value)
    assert len(P.open_split(kept[0], "test", image_size=8, max_frames=2)) == 4  # whole, usable
    # the same with --overwrite of an earlier output: a file saved into a split folder
    (out / "my_notes.txt").unlink()
    P.prepare(raw, out, **OPTS)

    def user_saves_inside(ds, tmp, split, *a, **k):
        if split == "test":
            (out / "train" / "mine.txt").write_text("precious")
        return real(ds, tmp, split, *a, **k)

    monkeypatch.setattr(P, "_prepare_split", user_saves_inside)
    with pytest.raises(FileExistsError, match="train/mine.txt"):
        P.prepare(raw, out, overwrite=True, image_size=10, max_frames=2, progress=False)
    monkeypatch.undo()
    assert (out / "train" / "mine.txt").read_text() == "precious"
    assert P.read_manifest(out)["image_size"] == [8, 8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left"


def test_two_prepares_into_one_new_out_the_later_does_not_replace_the_earlier(raw, tmp_path, monkeypatch):
    """Both saw a new OUT; the one that finished first is kept, the later one refuses without
    --overwrite (it used to rename the first's output aside and delete it), keeping its own
    output beside OUT; and when the other's output lands between the final check and the
    rename, the error is a clear one, not "[Errno 39] Directory not empty"."""
    real = P._prepare_split
    out = tmp_path / "out"
    nested = []

    def another_prepare_finishes_first(ds, tmp, split, *a, **k):
        if not nested:
            nested.append(1)
            P.prepare(raw, out, image_size=10, max_frames=2, progress=False)
        return real(ds, tmp, split, *a, **k)

    monkeypatch.setattr(P, "_prepare_split", another_prepare_finishes_first)
    with pytest.raises(FileExistsError, match="already holds a prepared data set") as info:
        P.prepare(raw, out, **OPTS)
    monkeypatch.undo()
    assert P.read_manifest(out)["image_size"] == [10, 10], "the earlier prepare's output was replaced"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and str(kept[0]) in str(info.value)
    assert P.read_manifest(kept[0])["image_size"] == [8, 8]
    # the other's output lands in the instant between the final check and the rename
    race = tmp_path / "race"
    real_rename = os.rename

    def lands_first(src, dst):
        if ".preparing-" in str(src) and not race.exists():
            import shutil
            shutil.copytree(out, race)
        return real_rename(src, dst)

    monkeypatch.setattr(P.os, "rename", lands_first)
    with pytest.raises(FileExistsError, match="something was put in its place") as info:
        P.prepare(raw, race, **OPTS)
    monkeypatch.undo()
    msg = str(info.value)
    assert "Errno" not in msg and P.read_manifest(race)["image_size"] == [10, 10], msg
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("race.new-")]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left"


def test_what_is_written_into_dir_while_demo_builds_is_kept(tmp_path, monkeypatch):
    real = demo_mod.render_demo_samples
    root = tmp_path / "demo"
    root.mkdir()

    def user_saves(params):
        (root / "my_notes.txt").write_text("precious")
        yield from real(params)

    monkeypatch.setattr(demo_mod, "render_demo_samples", user_saves)
    with pytest.raises(FileExistsError, match="checked again") as info:
        build_demo_dataset(root, samples_per_class=3)  # an empty DIR, no --overwrite
    assert "discarded" in str(info.value)
    assert _siblings(root) == ["my_notes.txt"] and _siblings(tmp_path) == ["demo"]
    (root / "my_notes.txt").unlink()
    monkeypatch.undo()
    build_demo_dataset(root, samples_per_class=3)

    def user_saves_inside(params):
        (root / "train" / "3" / "mine.txt").write_text("precious")
        yield from real(params)

    monkeypatch.setattr(demo_mod, "render_demo_samples", user_saves_inside)
    with pytest.raises(FileExistsError, match="did not write"):
        build_demo_dataset(root, samples_per_class=4, overwrite=True)
    monkeypatch.undo()
    assert (root / "train" / "3" / "mine.txt").read_text() == "precious"
    assert _siblings(tmp_path) == ["demo"]


def test_a_mount_point_is_refused_before_any_work(raw, tmp_path, monkeypatch):
    """A DIR / OUT that is a mount point (or a link to one): the build writes a temp folder
    beside it, on the parent's disk, and the final rename of a mount point fails with EBUSY
    after the whole build. Refused up front, naming it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    link = tmp_path / "link"
    link.symlink_to(disk, target_is_directory=True)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(disk) or real_ismount(p))

    def no_work(*a, **k):
        raise AssertionError("built before refusing")

    monkeypatch.setattr(demo_mod, "render_demo_samples", no_work)
    monkeypatch.setattr(P, "_prepare_split", no_work)
    for where in (disk, link):
        with pytest.raises(ValueError, match="is a mount point") as info:
            build_demo_dataset(where, samples_per_class=3)
        assert str(where) in str(info.value) and str(disk / "demo") in str(info.value)
        with pytest.raises(ValueError, match="is a mount point") as info:
            P.prepare(raw, where, **OPTS)
        assert str(where) in str(info.value) and "OUT" in str(info.value)
    assert _siblings(tmp_path) == ["disk", "link", "raw"] and _siblings(disk) == []


def test_a_link_into_a_missing_folder_is_refused_by_prepare_too(raw, tmp_path):
    """prepare into a dangling OUT link whose target's folder is missing (a drive not mounted)
    used to create the whole target path; now as demo: refused naming the link. A chain of
    links is named hop by hop."""
    dang = tmp_path / "dang"
    dang.symlink_to(tmp_path / "usb" / "data" / "prepared", target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        P.prepare(raw, dang, **OPTS)
    msg = str(info.value)
    assert f"OUT {dang} (a symbolic link to" in msg and str(tmp_path / "usb") + " does not exist" in msg, msg
    chain = tmp_path / "l_a"
    chain.symlink_to("l_b")
    (tmp_path / "l_b").symlink_to(tmp_path / "missing" / "x" / "y")
    for call in (lambda: P.prepare(raw, chain, **OPTS),
                 lambda: build_demo_dataset(chain, samples_per_class=3)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert f"{chain} points to l_b, which points to {tmp_path / 'missing' / 'x' / 'y'}" in msg, msg
        assert f"{tmp_path / 'missing'} does not exist" in msg, msg
    assert _siblings(tmp_path) == ["dang", "l_a", "l_b", "raw"]
    # a link whose target's folder exists is built into, the link kept (as demo does)
    to_new = tmp_path / "to_new"
    to_new.symlink_to(tmp_path / "new", target_is_directory=True)
    P.prepare(raw, to_new, **OPTS)
    assert to_new.is_symlink() and P.is_prepared(tmp_path / "new")


def test_an_out_link_placed_inside_a_raw_split_folder_is_refused(raw, tmp_path):
    """Only the link's target was checked: a link OUT inside SRC/validation/ passed, and the
    raw split then had a class folder that is the prepared set."""
    link = raw / "validation" / "prep"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match="inside the raw split folder") as info:
        P.prepare(raw, link, **OPTS)
    assert f"{link} (a symbolic link to {tmp_path / 'elsewhere'})" in str(info.value)
    assert not (tmp_path / "elsewhere").exists()


@pytest.fixture
def resolve_as_on_python_313(monkeypatch):
    """Path.resolve() as Python 3.13 has it: a loop of links no longer raises (RuntimeError
    before 3.13), the path comes back as it is."""
    real = pathlib.Path.resolve

    def resolve(self, strict=False):
        try:
            return real(self, strict)
        except RuntimeError:
            return pathlib.Path(os.path.abspath(self))

    monkeypatch.setattr(pathlib.Path, "resolve", resolve)


@pytest.mark.parametrize("python", ["this", "3.13"])
def test_a_loop_of_links_is_refused_naming_it(raw, tmp_path, python, request):
    """On Python 3.13 a loop was not refused: demo replaced the link by a folder and left a
    `.old-` link behind; prepare decoded everything, then failed with "Not a directory"."""
    if python == "3.13":
        request.getfixturevalue("resolve_as_on_python_313")
    (tmp_path / "lpa").symlink_to("lpb")
    (tmp_path / "lpb").symlink_to("lpa")
    (tmp_path / "self").symlink_to("self")
    for loop in ("lpa", "self"):
        where = tmp_path / loop
        with pytest.raises(FileNotFoundError, match="form a loop") as info:
            build_demo_dataset(where, samples_per_class=3)
        assert f"demo data root {where}" in str(info.value)
        with pytest.raises(FileNotFoundError, match="form a loop") as info:
            P.prepare(raw, where, **OPTS)
        chain = f"{tmp_path / 'lpa'} -> lpb -> lpa" if loop == "lpa" else f"{where} -> self"
        assert f"OUT {where}" in str(info.value) and chain in str(info.value), str(info.value)
        with pytest.raises(FileNotFoundError, match="form a loop"):
            P.prepare(raw, where / "sub", **OPTS)  # a loop on the way
    assert _siblings(tmp_path) == ["lpa", "lpb", "raw", "self"]
    assert all((tmp_path / n).is_symlink() for n in ("lpa", "lpb", "self"))


def test_a_rerun_without_overwrite_after_a_killed_overwrite_keeps_the_earlier_output(raw, tmp_path):
    """A `--overwrite` killed between its two renames leaves the earlier output renamed aside and
    no OUT; the next run put it back and then, without --overwrite, replaced it anyway."""
    out = tmp_path / "out"
    P.prepare(raw, out, **OPTS)
    dead = _dead_pid()
    out.rename(tmp_path / f".out.old-{dead}-x")
    (tmp_path / f".out.preparing-{dead}-x" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        P.prepare(raw, out, image_size=10, max_frames=2, progress=False)
    assert P.read_manifest(out)["image_size"] == [8, 8] and _siblings(tmp_path) == ["out", "raw"]
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    root.rename(tmp_path / f".d.old-{dead}-x")
    with pytest.raises(FileExistsError, match="other parameters"):
        build_demo_dataset(root, samples_per_class=4)
    assert json.loads((root / demo_mod.MARKER).read_text())["parameters"]["samples_per_class"] == 3
    assert _siblings(tmp_path) == ["d", "out", "raw"]


def test_prepare_names_out_as_given_and_its_target(raw, tmp_path):
    out = tmp_path / "out"
    P.prepare(raw, out, **OPTS)
    link = tmp_path / "lo"
    link.symlink_to("out")
    with pytest.raises(FileExistsError, match="already holds") as info:
        P.prepare(raw, link, **OPTS)
    assert f"OUT {link} (a symbolic link to {out})" in str(info.value)
    (tmp_path / "f").write_text("x")
    (tmp_path / "lf").symlink_to("f")
    with pytest.raises(FileExistsError, match="exists and is not a folder") as info:
        P.prepare(raw, tmp_path / "lf", overwrite=True, **OPTS)
    assert f"OUT {tmp_path / 'lf'} (a symbolic link to {tmp_path / 'f'})" in str(info.value)
    for call in (lambda: P.prepare(raw, tmp_path / "f" / "sub", **OPTS),  # a file on the way
                 lambda: build_demo_dataset(tmp_path / "lf" / "sub", samples_per_class=3)):
        with pytest.raises(FileExistsError, match=f"{tmp_path / 'f'} is a file, not a folder"):
            call()
    assert (tmp_path / "f").read_text() == "x"


def test_a_cache_build_refused_from_inside_says_why_it_must_be_rebuilt(tmp_path, monkeypatch):
    """`dtl-fast train` without --data, run inside its outdated cache folder: refused (the
    user named no folder) without saying that the cached build is outdated."""
    root = build_demo_dataset(tmp_path / "cache", samples_per_class=3)
    marker = root / demo_mod.MARKER
    marker.write_text(marker.read_text().replace(f'"version": {demo_mod.VERSION}', '"version": 0'))
    monkeypatch.chdir(root / "train")
    with pytest.raises(FileExistsError, match="current folder or holds it") as info:
        build_demo_dataset(root, samples_per_class=3, replace_other_build=True)
    msg = str(info.value)
    assert "other parameters" in msg and "version 0 vs" in msg and f"cd {tmp_path} first" in msg, msg
    assert '"version": 0' in marker.read_text()


def test_a_concurrent_identical_demo_build_is_accepted(tmp_path, monkeypatch):
    """Another process finishing the same build into DIR while this one runs: nothing to
    replace, this build's temp is dropped and DIR kept as the other left it."""
    real = demo_mod.render_demo_samples
    root = tmp_path / "demo"
    nested = []

    def another_build_finishes_first(params):
        if not nested:
            nested.append(1)
            build_demo_dataset(root, samples_per_class=3)
        yield from real(params)

    monkeypatch.setattr(demo_mod, "render_demo_samples", another_build_finishes_first)
    assert build_demo_dataset(root, samples_per_class=3) == root
    assert nested and demo_mod.is_demo_build(root) and _siblings(tmp_path) == ["demo"]


def test_what_lands_in_the_folder_renamed_aside_is_kept_not_deleted(raw, tmp_path, monkeypatch):
    """The instant between renaming the earlier output aside and deleting it: a file written
    into it then (through an open folder) is not deleted; the folder is kept beside OUT/DIR
    under a visible name, with a warning naming it."""
    real_rename = os.rename

    def writes_after_the_rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            (pathlib.Path(dst) / "late.txt").write_text("precious")

    out = tmp_path / "out"
    P.prepare(raw, out, **OPTS)
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    monkeypatch.setattr(os, "rename", writes_after_the_rename)
    with pytest.warns(UserWarning, match="was kept in") as record:
        P.prepare(raw, out, overwrite=True, image_size=10, max_frames=2, progress=False)
    with pytest.warns(UserWarning, match="was kept in"):
        build_demo_dataset(root, samples_per_class=4, overwrite=True)
    monkeypatch.undo()
    assert P.read_manifest(out)["image_size"] == [10, 10]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(kept) == 1 and (kept[0] / "late.txt").read_text() == "precious"
    assert str(kept[0]) in str(record[0].message)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("d.replaced-")]
    assert len(kept) == 1 and (kept[0] / "late.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left"
