"""dtl_fast.data: the multimodal folder layout, batching, bad-sample handling and the demo set."""
import importlib.util
import json
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dtl_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    BadSampleError,
    MultiModalBatch,
    MultiModalFolder,
    build_demo_dataset,
    collate_multimodal,
)
from dtl_fast.data import demo as demo_mod

HAS_AV = importlib.util.find_spec("av") is not None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """The check manifests go to a folder of this test (outside tmp_path, whose listing some
    tests check), not to ~/.cache."""
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))


def _png(path, value, size=(6, 6), mode="RGB"):
    """Writes a constant image; value is an int (gray) or an (r, g, b) triple."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), value).save(path)
    return path


def _sample(split_dir, cls, stem, frames=3, value=(10, 20, 30), frame_values=None):
    """One image + a frame folder whose frame k has gray value frame_values[k] (default 10 k)."""
    folder = pathlib.Path(split_dir) / cls
    image = _png(folder / f"{stem}.png", value)
    values = frame_values if frame_values is not None else [10 * k for k in range(frames)]
    for k, v in enumerate(values):
        _png(folder / stem / f"{k}.png", v, mode="L")
    return image, folder / stem


@pytest.fixture
def small_set(tmp_path):
    root = tmp_path / "set"
    _sample(root / "train", "cat", "a", frames=2)
    _sample(root / "train", "cat", "b", frames=5)
    _sample(root / "train", "dog", "c", frames=3)
    _sample(root / "validation", "dog", "d", frames=1)
    (root / "train" / "cat" / "notes.txt").write_text("not a sample")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    return root


def _expected(value_0_255, channel=0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (value_0_255 / 255.0 - mean[channel]) / std[channel]


# ---------------------------------------------------------------------------- layout, values


def test_layout_shapes_and_dtypes(small_set):
    ds = MultiModalFolder(small_set, "train", image_size=(4, 5), frame_size=6, max_frames=16)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert [(os.path.basename(i), os.path.basename(v), y) for i, v, y in ds.samples] == [
        ("a.png", "a", 0), ("b.png", "b", 0), ("c.png", "c", 1)]
    assert len(ds) == 3 and ds.skipped == [] and ds.num_frames == [2, 5, 3]
    image, video, label = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 4, 5)
    assert video.dtype == torch.float32 and video.shape == (5, 3, 6, 6)
    assert label == 0 and isinstance(label, int)
    assert ds[-1][2] == 1


def test_normalisation_matches_a_hand_computed_pixel(tmp_path):
    root = tmp_path / "set"
    img = Image.new("RGB", (2, 2), (0, 0, 0))
    img.putpixel((1, 0), (10, 200, 255))  # x=1, y=0
    (root / "train" / "k").mkdir(parents=True)
    img.save(root / "train" / "k" / "s.png")
    _png(root / "train" / "k" / "s" / "0.png", 128, size=(2, 2), mode="L")
    ds = MultiModalFolder(root, image_size=2)
    image, video, _ = ds[0]
    for c, v in enumerate((10, 200, 255)):
        assert image[c, 0, 1].item() == pytest.approx(_expected(v, c), abs=1e-6)
        assert image[c, 1, 1].item() == pytest.approx(_expected(0, c), abs=1e-6)
        # a grayscale frame becomes RGB: the same value in each channel, each normalised with its own stats
        assert video[0, c, 0, 0].item() == pytest.approx(_expected(128, c), abs=1e-6)
    gray = MultiModalFolder(root, image_size=2, channels=1)
    g_image, g_video, _ = gray[0]
    assert g_image.shape == (1, 2, 2) and g_video.shape == (1, 1, 2, 2)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # documented: averaged for one channel
    luma = round(10 * 299 / 1000 + 200 * 587 / 1000 + 255 * 114 / 1000)  # PIL's RGB -> L
    assert g_image[0, 0, 1].item() == pytest.approx((luma / 255 - mean) / std, abs=1 / 255 / std + 1e-6)
    assert g_video[0, 0, 0, 0].item() == pytest.approx((128 / 255 - mean) / std, abs=1e-6)
    plain = MultiModalFolder(root, image_size=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert plain[0][0][:, 0, 1].tolist() == pytest.approx([10 / 255, 200 / 255, 1.0], abs=1e-7)


def test_resize_is_bilinear_to_the_requested_size(tmp_path):
    root = tmp_path / "set"
    _sample(root / "train", "k", "s", frames=1)
    img = Image.new("L", (8, 4), 0)
    for x in range(8):
        for y in range(4):
            img.putpixel((x, y), 30 * x)
    img.save(root / "train" / "k" / "s.png")
    ds = MultiModalFolder(root, image_size=(2, 4), frame_size=(3, 3), mean=(0,), std=(1,), channels=1)
    image, video, _ = ds[0]
    want = np.asarray(img.resize((4, 2), Image.BILINEAR), dtype=np.float32) / 255
    assert image.shape == (1, 2, 4) and video.shape == (1, 1, 3, 3)
    assert torch.allclose(image[0], torch.from_numpy(want), atol=1e-6)
    assert image[0, 0, 0] < image[0, 0, 3]  # left-to-right ramp survives


def test_class_indices_consistent_across_splits(small_set):
    train = MultiModalFolder(small_set, "train")
    val = MultiModalFolder(small_set, "validation", classes=train.classes)
    assert val.classes == ["cat", "dog"] and [y for _, _, y in val.samples] == [1]
    alone = MultiModalFolder(small_set, "validation")
    assert alone.classes == ["dog"] and alone.samples[0][2] == 0  # why classes= exists
    _sample(small_set / "validation", "emu", "e")
    with pytest.raises(ValueError, match="emu"):
        MultiModalFolder(small_set, "validation", classes=train.classes)


def test_frame_folder_natural_order_and_ignored_files(tmp_path):
    root = tmp_path / "set"
    names = ["f1.png", "f2.png", "f10.png", "f11.png", "f3.png"]
    values = {"f1.png": 10, "f2.png": 20, "f3.png": 30, "f10.png": 100, "f11.png": 110}
    _png(root / "train" / "k" / "s.png", 0)
    for n in names:
        _png(root / "train" / "k" / "s" / n, values[n], mode="L")
    (root / "train" / "k" / "s" / "readme.txt").write_text("x")
    (root / "train" / "k" / "s" / ".f0.png").write_bytes(b"junk")
    ds = MultiModalFolder(root, mean=(0, 0, 0), std=(1, 1, 1))
    video = ds[0][1]
    got = [round(v * 255) for v in video[:, 0, 0, 0].tolist()]
    assert got == [10, 20, 30, 100, 110]  # plain sorting would put f10, f11 before f2


@pytest.mark.parametrize("max_frames, kept", [(4, [1, 3, 6, 8]), (1, [5]), (10, list(range(10))),
                                              (16, list(range(10))), (None, list(range(10)))])
def test_max_frames_subsamples_uniformly(tmp_path, max_frames, kept):
    root = tmp_path / "set"
    _sample(root / "train", "k", "s", frame_values=[20 * k for k in range(10)])
    ds = MultiModalFolder(root, max_frames=max_frames, mean=(0, 0, 0), std=(1, 1, 1))
    video = ds[0][1]
    assert [round(v * 255) for v in video[:, 1, 2, 3].tolist()] == [20 * k for k in kept]


# ---------------------------------------------------------------------------- batching


def test_collate_pads_with_zeros_and_reports_lengths(small_set):
    ds = MultiModalFolder(small_set, "train", image_size=4, frame_size=3)
    batch = collate_multimodal([ds[0], ds[1], ds[2]])
    assert isinstance(batch, MultiModalBatch)
    assert batch.images.shape == (3, 3, 4, 4) and batch.images.dtype == torch.float32
    assert batch.videos.shape == (3, 5, 3, 3, 3) and batch.videos.dtype == torch.float32
    assert batch.lengths.dtype == torch.int64 and batch.lengths.tolist() == [2, 5, 3]
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [0, 0, 1]
    for b, n in enumerate([2, 5, 3]):
        assert torch.equal(batch.videos[b, :n], ds[b][1])
        assert (batch.videos[b, n:] == 0).all()
        assert torch.equal(batch.images[b], ds[b][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_multimodal)
    first = next(iter(loader))
    assert isinstance(first, MultiModalBatch) and first.lengths.tolist() == [2, 5]
    _, videos, _, _ = first  # unpacks like a tuple
    assert videos.shape[1] == 5


def test_batch_to_moves_every_tensor(small_set):
    ds = MultiModalFolder(small_set, "train", image_size=4, frame_size=3)
    batch = collate_multimodal([ds[0], ds[2]])
    moved = batch.to("meta")
    assert isinstance(moved, MultiModalBatch)
    assert all(t.device.type == "meta" for t in moved)
    assert [t.dtype for t in moved] == [t.dtype for t in batch]
    same = batch.to(torch.device("cpu"), non_blocking=True)
    assert all(torch.equal(a, b) for a, b in zip(same, batch))


def test_collate_rejects_bad_input():
    img, vid = torch.zeros(3, 4, 4), torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="non-empty"):
        collate_multimodal([])
    with pytest.raises(ValueError, match=r"samples\[1\] image shape"):
        collate_multimodal([(img, vid, 0), (torch.zeros(3, 5, 4), vid, 1)])
    with pytest.raises(ValueError, match=r"samples\[1\] frame shape"):
        collate_multimodal([(img, vid, 0), (img, torch.zeros(2, 3, 5, 4), 1)])
    with pytest.raises(ValueError, match="T >= 1"):
        collate_multimodal([(img, torch.zeros(0, 3, 4, 4), 0)])


# ---------------------------------------------------------------------------- bad samples


def _missing_video(split_dir):
    return _png(split_dir / "k" / "bad.png", 5)


def _empty_frame_folder(split_dir):
    _png(split_dir / "k" / "bad.png", 5)
    (split_dir / "k" / "bad").mkdir()
    (split_dir / "k" / "bad" / "notes.txt").write_text("no frames here")
    return split_dir / "k" / "bad"


def _corrupt_image(split_dir):
    _sample(split_dir, "k", "bad")
    path = split_dir / "k" / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return path


def _truncated_frame(split_dir):
    _, frames = _sample(split_dir, "k", "bad", frames=2)
    path = frames / "1.png"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8), "L")
    noisy.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _orphan_video(split_dir):
    for k in range(2):
        _png(split_dir / "k" / "bad" / f"{k}.png", 5, mode="L")
    return split_dir / "k" / "bad"


def _two_images(split_dir):
    _sample(split_dir, "k", "bad")
    _png(split_dir / "k" / "bad.jpg", (1, 2, 3))
    return split_dir / "k" / "bad.jpg"


BAD = {"missing video": (_missing_video, "no video"),
       "empty frame folder": (_empty_frame_folder, "no frame images"),
       "corrupt png": (_corrupt_image, "corrupt|not a readable image"),
       "truncated frame": (_truncated_frame, "truncated|corrupt"),
       "video without image": (_orphan_video, "no image"),
       "two images one stem": (_two_images, "several images")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_error_names_the_path(tmp_path, case):
    make, reason = BAD[case]
    root = tmp_path / "set"
    _sample(root / "train", "k", "good1")
    _sample(root / "train", "k", "good2")
    bad_path = str(make(root / "train"))
    with pytest.raises(BadSampleError, match=reason) as info:
        MultiModalFolder(root)
    assert bad_path in str(info.value) and info.value.bad[0][0] == bad_path
    assert isinstance(info.value, RuntimeError)

    with pytest.warns(UserWarning, match="skipped 1 bad sample") as record:
        ds = MultiModalFolder(root, on_bad_sample="skip")
    assert len(record) == 1  # once per data set, not once per file
    assert len(ds) == 2 and {os.path.basename(s[0]) for s in ds.samples} == {"good1.png", "good2.png"}
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == bad_path
    assert ds[0][1].shape[0] == 3 and ds[1][1].shape[0] == 3


def test_bad_sample_error_lists_twenty_then_counts(tmp_path):
    root = tmp_path / "set"
    paths = [str(_png(root / "train" / "k" / f"x{i}.png", 5)) for i in range(25)]
    with pytest.raises(BadSampleError) as info:
        MultiModalFolder(root)
    msg = str(info.value)
    assert "25 bad samples" in msg and "and 5 more" in msg
    assert all(p in msg for p in paths[:20]) and paths[24] not in msg  # x0..x19 in natural order
    assert len(info.value.bad) == 25
    import pickle
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == msg and again.bad == info.value.bad
    with pytest.raises(BadSampleError, match="every sample is bad"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MultiModalFolder(root, on_bad_sample="skip")


def test_file_removed_after_the_check_is_reported_on_read(small_set):
    ds = MultiModalFolder(small_set, "train")
    os.remove(small_set / "train" / "dog" / "c" / "1.png")
    os.remove(small_set / "train" / "dog" / "c" / "2.png")
    os.remove(small_set / "train" / "dog" / "c" / "0.png")
    with pytest.raises(BadSampleError, match="no frame images") as info:
        ds[2]
    assert str(small_set / "train" / "dog" / "c") in str(info.value)


def test_layout_errors(tmp_path, small_set):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MultiModalFolder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"split folder .*'test'.*train"):
        MultiModalFolder(small_set, "test")
    (small_set / "test").mkdir()
    (small_set / "test" / "stray.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class folders in .*test"):
        MultiModalFolder(small_set, "test")
    (small_set / "test" / "k").mkdir()
    with pytest.raises(ValueError, match="no samples in"):
        MultiModalFolder(small_set, "test")


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=0), "image_size"), (dict(image_size=(3,)), "image_size"),
    (dict(image_size="32"), "image_size"), (dict(image_size=True), "image_size"),
    (dict(image_size=(4, -1)), "image_size"), (dict(frame_size=2.5), "frame_size"),
    (dict(max_frames=0), "max_frames"), (dict(max_frames=1.5), "max_frames"),
    (dict(on_bad_sample="ignore"), "on_bad_sample"), (dict(channels=2), "channels"),
    (dict(mean=(0.5, 0.5)), "mean"), (dict(std=(0.2, 0.0, 0.2)), "std"), (dict(std=0.5), "std"),
    (dict(classes="cat"), "classes"), (dict(classes=["cat", "cat"]), "classes"),
    (dict(split="../train"), "split"), (dict(split=""), "split"),
])
def test_argument_errors_name_the_argument(small_set, kwargs, name):
    kwargs = dict(kwargs)
    split = kwargs.pop("split", "train")
    with pytest.raises(ValueError, match=name):
        MultiModalFolder(small_set, split, **kwargs)


def test_mp4_needs_pyav_or_decodes(tmp_path):
    root = tmp_path / "set"
    _png(root / "train" / "k" / "clip.png", 7)
    mp4 = root / "train" / "k" / "clip.mp4"
    if not HAS_AV:
        mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        with pytest.raises(RuntimeError, match="pip install av") as info:
            MultiModalFolder(root, on_bad_sample="skip")  # not a data problem: never skipped
        assert str(mp4) in str(info.value)
        return
    import av  # decoding path, where PyAV is installed
    with av.open(str(mp4), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for k in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ds = MultiModalFolder(root, frame_size=8, max_frames=3, mean=(0, 0, 0), std=(1, 1, 1))
    video = ds[0][1]
    assert video.shape == (3, 3, 8, 8) and ds.num_frames == [6]
    assert video[0].mean() < video[1].mean() < video[2].mean()


# ---------------------------------------------------------------------------- the demo set


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def test_demo_build_is_deterministic_and_stratified(tmp_path):
    a = build_demo_dataset(tmp_path / "a", seed=3, samples_per_class=5)
    b = build_demo_dataset(tmp_path / "b", seed=3, samples_per_class=5)
    c = build_demo_dataset(tmp_path / "c", seed=4, samples_per_class=5)
    assert a == tmp_path / "a"
    assert _listing(a) == _listing(b)
    frames = sorted(p for p in pathlib.Path(a).rglob("*.png"))
    assert len(frames) > 50
    for p in frames[:: len(frames) // 7]:
        assert p.read_bytes() == (b / p.relative_to(a)).read_bytes()
    assert _listing(a) != _listing(c)  # another seed: another split
    for split in SPLITS:
        for digit in range(10):
            stems = [p for p in (a / split / str(digit)).iterdir() if p.suffix == ".png"]
            assert len(stems) == {"train": 3, "validation": 1, "test": 1}[split]
    marker = json.loads((a / demo_mod.MARKER).read_text())
    assert marker["parameters"]["seed"] == 3 and marker["version"] == demo_mod.VERSION
    assert sum(marker["counts"]["train"].values()) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    train = MultiModalFolder(a, "train")
    test = MultiModalFolder(a, "test", classes=train.classes)
    assert train.classes == [str(d) for d in range(10)] and len(train) == 30 and len(test) == 10
    for ds in (train, test):
        for (image_path, _, label), n in zip(ds.samples, ds.num_frames):
            assert pathlib.Path(image_path).parent.name == str(label) and 4 <= n <= 12
    image, video, _ = train[0]
    assert image.shape == (3, 32, 32) and video.shape[1:] == (3, 32, 32)
    assert image.std() > 0.1 and video.std() > 0.1


def test_demo_video_is_another_handwriting_of_the_same_digit(tmp_path):
    params = dict(demo_mod.build_demo_dataset.__kwdefaults__)
    params.update(seed=0, samples_per_class=8, video_noise=0.0, video_occluder=0, image_noise=0.0,
                  image_occluder=0, motion=0.0, image_jitter=0)
    params["split_fractions"] = list(params["split_fractions"])
    del params["overwrite"]
    images, labels = demo_mod._load_digits()
    a = demo_mod._upsample_matrix(params["video_digit_size"])
    glyphs = a @ images @ a.T  # every digit as the clip draws it
    seen = 0
    for split, label, stem, image, clip in demo_mod.render_demo_samples(params):
        i = int(stem)
        assert labels[i] == label
        err = np.abs(glyphs - clip[0][7:25, 7:25]).reshape(len(labels), -1).max(1)
        matches = np.flatnonzero(err < 1e-5).tolist()
        if split == "train":  # 6 train samples per digit: the partner is always someone else
            assert matches and all(j != i and labels[j] == label for j in matches)
            seen += 1
    assert seen == 60


def test_demo_marker_makes_a_second_call_a_no_op(tmp_path, monkeypatch):
    root = build_demo_dataset(tmp_path / "d", samples_per_class=3)
    before = (root / demo_mod.MARKER).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt although the marker matches")

    monkeypatch.setattr(demo_mod, "render_demo_samples", boom)
    assert build_demo_dataset(tmp_path / "d", samples_per_class=3) == root
    assert (root / demo_mod.MARKER).stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other parameters.*samples_per_class"):
        build_demo_dataset(root, samples_per_class=4)
    monkeypatch.undo()
    build_demo_dataset(root, samples_per_class=4, overwrite=True)
    assert json.loads((root / demo_mod.MARKER).read_text())["parameters"]["samples_per_class"] == 4
    assert len(MultiModalFolder(root, "validation")) == 10


def test_demo_folder_without_marker_is_refused_even_with_overwrite(tmp_path):
    # builds are atomic, so a folder without the marker is not ours: it is never replaced
    root = tmp_path / "d"
    (root / "train" / "3").mkdir(parents=True)
    (root / "train" / "3" / "0001.png").write_bytes(b"half")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not a demo data set.*holds train/"):
            build_demo_dataset(root, samples_per_class=3, overwrite=overwrite)
        assert (root / "train" / "3" / "0001.png").read_bytes() == b"half"  # nothing lost

    other = tmp_path / "mine"
    (other / "train").mkdir(parents=True)
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        build_demo_dataset(other, samples_per_class=3, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        build_demo_dataset(tmp_path / "file", samples_per_class=3)


def test_demo_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = demo_mod._write_png

    def dies_midway(path, pixels):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        real(path, pixels)

    monkeypatch.setattr(demo_mod, "_write_png", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path / "d", samples_per_class=3)
    assert list(tmp_path.iterdir()) == []  # neither the root nor a temp folder
    # a build killed outright (no cleanup) leaves a temp folder that the next build removes
    stale = tmp_path / ".d.building-999999999-deadbeef"
    (stale / "train").mkdir(parents=True)
    monkeypatch.undo()
    build_demo_dataset(tmp_path / "d", samples_per_class=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(samples_per_class=2), "samples_per_class"), (dict(seed=-1), "seed"),
    (dict(min_frames=5, max_frames=4), "max_frames"), (dict(image_noise=-0.1), "image_noise"),
    (dict(split_fractions=(0.5, 0.5, 0.5)), "split_fractions"), (dict(digit_size=40), "digit_size"),
])
def test_demo_argument_errors(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_demo_dataset(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()
