"""Clips in every container: real files encoded here with PyAV (H.264, MPEG-4, VP8) and animated
GIFs written with Pillow, read through MultiModalFolder and compared with what was encoded; the
rules that tell the clip of a stem apart (a .gif beside a still image, two clips of one stem);
video files without a video stream or with undecodable bytes."""
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from dtl_fast.data import BadSampleError, MultiModalFolder
from dtl_fast.data import video as video_mod
from _helpers import encode_clip

av = pytest.importorskip("av", reason="PyAV is needed to encode and decode the test clips")

H, W, T = 32, 48, 10
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # video * 255 = the decoded pixels

# Lossy codecs at these sizes land near 2-4 grey levels of mean abs error (measured: H.264 2.1,
# MPEG-4 3.4, VP8 2.1); neighbouring frames of the clip below differ by ~20, so 8 separates a
# right decode from a wrong frame order with room on both sides (checked in the test itself).
TOLERANCE = 8.0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Manifests go to a folder of this test, not to ~/.cache."""
    monkeypatch.setenv("DTL_FAST_CACHE", str(tmp_path / "cache"))


def _clip_frames(n=T):
    """n RGB frames uint8 [H, W, 3], each unlike its neighbours: a horizontal ramp in green, a
    level in red that rises with t and a level in blue that falls."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        frames[t, ..., 0] = (25 * t) % 256
        frames[t, ..., 1] = np.linspace(0, 255, W, dtype=np.float64)[None, :].round().astype(np.uint8)
        frames[t, ..., 2] = 250 - 25 * t
    return frames


ENCODERS = {"h264": ("libx264", "libopenh264", "h264"), "mpeg4": ("mpeg4",), "vp8": ("libvpx", "vp8")}


def _encoder(kind):
    """The first encoder of `kind` this PyAV build has, or skip saying which are missing."""
    for name in ENCODERS[kind]:
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
                return name
            except Exception:  # a decoder of that name without an encoder
                continue
    pytest.skip(f"this PyAV build has no {kind} encoder (tried {', '.join(ENCODERS[kind])})")


def _encode(path, kind, frames):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_clip(path, frames, _encoder(kind))


def _gif(path, frames):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def _gif_frames(n=6):
    """Few colours per frame, so GIF's 256-colour palette holds them exactly."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        frames[t, :, : W // 2] = (40 * t, 0, 200)
        frames[t, :, W // 2:] = (0, 255 - 40 * t, 30 * t)
    return frames


def _image(path, value=(9, 99, 199)):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), value).save(path)
    return path


def _decoded(ds, i=0):
    """dataset[i]'s clip as float pixels [T, H, W, 3] in 0..255."""
    return ds[i][1].permute(0, 2, 3, 1).numpy() * 255.0


CONTAINERS = [("mp4", "h264"), ("m4v", "h264"), ("mov", "h264"), ("mov", "mpeg4"), ("avi", "mpeg4"),
              ("mkv", "h264"), ("mkv", "vp8"), ("webm", "vp8")]


@pytest.mark.parametrize("ext, codec", CONTAINERS, ids=[f"{e}-{c}" for e, c in CONTAINERS])
def test_every_container_decodes_to_the_encoded_frames(tmp_path, ext, codec):
    root = tmp_path / "set"
    frames = _clip_frames()
    _image(root / "train" / "k" / "s.png")
    clip = _encode(root / "train" / "k" / f"s.{ext}", codec, frames)
    ds = MultiModalFolder(root, frame_size=(H, W), max_frames=None, **PLAIN)
    assert ds.samples == [(str(root / "train" / "k" / "s.png"), str(clip), 0)]
    assert ds.num_frames == [T] and ds.skipped == []
    got = _decoded(ds)
    assert got.shape == (T, H, W, 3)
    err = np.abs(got - frames).mean()
    assert err < TOLERANCE, f"{ext}/{codec}: mean abs difference {err:.2f} grey levels"
    # the tolerance can fail: the same frames one step out of order, or reversed, are far off
    shifted = np.abs(got[1:] - frames[:-1]).mean()
    reversed_ = np.abs(got[::-1] - frames).mean()
    assert shifted > 2 * TOLERANCE and reversed_ > 2 * TOLERANCE, (shifted, reversed_)

    # subsampling picks the same frames from a video file as from a frame folder
    kept = video_mod.subsample_indices(T, 4)
    ds4 = MultiModalFolder(root, frame_size=(H, W), max_frames=4, **PLAIN)
    assert ds4.num_frames == [T]
    assert np.abs(_decoded(ds4) - frames[kept]).mean() < TOLERANCE
    # the uint8 loader the prepare step uses gives the same pixels
    raw = video_mod.load_video_uint8(clip, (H, W), "RGB", 4)
    assert raw.dtype == np.uint8 and raw.shape == (4, H, W, 3)
    assert np.array_equal(raw.astype(np.float64), np.round(_decoded(ds4)))


def test_upper_case_extension_and_gray_mode(tmp_path):
    root = tmp_path / "set"
    frames = _clip_frames()
    _image(root / "train" / "k" / "s.jpg")
    _encode(root / "train" / "k" / "s.MKV", "vp8", frames)
    ds = MultiModalFolder(root, frame_size=(H, W), max_frames=None, channels=1, mean=(0.0,), std=(1.0,))
    video = ds[0][1]
    assert video.shape == (T, 1, H, W)
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # PIL's RGB -> L
    assert np.abs(video[:, 0].numpy() * 255 - luma).mean() < TOLERANCE


def test_animated_gif_beside_a_still_image_is_the_clip(tmp_path):
    root = tmp_path / "set"
    frames = _gif_frames()
    _image(root / "train" / "k" / "a.png")
    gif = _gif(root / "train" / "k" / "a.gif", frames)
    ds = MultiModalFolder(root, frame_size=(H, W), max_frames=None, **PLAIN)
    assert ds.samples == [(str(root / "train" / "k" / "a.png"), str(gif), 0)]
    assert ds.num_frames == [len(frames)]
    # the colours fit the palette: the decode is exact
    assert np.array_equal(np.round(_decoded(ds)), frames.astype(np.float64))
    ds3 = MultiModalFolder(root, frame_size=(H, W), max_frames=3, **PLAIN)
    assert np.array_equal(np.round(_decoded(ds3)), frames[video_mod.subsample_indices(6, 3)].astype(np.float64))


def test_gif_alone_or_beside_a_video_is_the_image(tmp_path):
    root = tmp_path / "set"
    frames = _clip_frames()
    still = _gif(root / "train" / "k" / "a.gif", _gif_frames(2))
    clip = _encode(root / "train" / "k" / "a.mp4", "h264", frames)
    lonely = _gif(root / "train" / "k" / "b.gif", _gif_frames(3))
    with pytest.raises(BadSampleError, match="no video for this image") as info:
        MultiModalFolder(root)
    assert info.value.bad == [(str(lonely), info.value.bad[0][1])]
    assert "b.gif alone is the image" in info.value.bad[0][1] and ".webm" in info.value.bad[0][1]
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = MultiModalFolder(root, frame_size=(H, W), image_size=(H, W), max_frames=None,
                              on_bad_sample="skip", **PLAIN)
    assert ds.samples == [(str(still), str(clip), 0)] and ds.num_frames == [T]
    image = ds[0][0].permute(1, 2, 0).numpy() * 255  # the first frame of a.gif
    assert np.array_equal(np.round(image), _gif_frames(2)[0].astype(np.float64))


def _two(root, first, second):
    """A stem with a still image and two clips named first and second (a trailing / is a folder)."""
    folder = root / "train" / "k"
    _image(folder / "s.png")
    paths = []
    for name in (first, second):
        if name.endswith("/"):
            _image(folder / name / "0.png")
            paths.append(folder / name.rstrip("/"))
        elif name.endswith(".gif"):
            paths.append(_gif(folder / name, _gif_frames(2)))
        else:
            paths.append(_encode(folder / name, {"webm": "vp8", "avi": "mpeg4"}.get(name.split(".")[-1], "h264"),
                                 _clip_frames(3)))
    return paths


@pytest.mark.parametrize("first, second", [("s.mp4", "s.webm"), ("s.avi", "s/"), ("s.gif", "s.mkv"),
                                           ("s.mov", "s.MOV")])
def test_two_clips_of_one_stem_is_a_bad_sample_naming_both(tmp_path, first, second):
    root = tmp_path / "set"
    _image(root / "train" / "k" / "ok.png")
    _encode(root / "train" / "k" / "ok.webm", "vp8", _clip_frames(3))
    paths = _two(root, first, second)
    with pytest.raises(BadSampleError, match="several clips share the stem 's'") as info:
        MultiModalFolder(root)
    (path, reason), = info.value.bad
    assert path == min(str(p) for p in paths)
    assert first in reason and second in reason, reason
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = MultiModalFolder(root, on_bad_sample="skip")
    assert [os.path.basename(v) for _, v, _ in ds.samples] == ["ok.webm"] and ds.num_frames == [3]


def _audio_only(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=8000)
        for i in range(3):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, 800 * i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


BROKEN = {
    "audio only": (lambda p: _audio_only(p.with_suffix(".mkv")), "no video stream"),
    "random bytes": (lambda p: (p.with_suffix(".webm").write_bytes(b"\x1aE\xdf\xa3" + os.urandom(2000)),
                                p.with_suffix(".webm"))[1], "corrupt or undecodable"),
    "empty file": (lambda p: (p.with_suffix(".mov").write_bytes(b""), p.with_suffix(".mov"))[1],
                   "corrupt or undecodable"),
    "truncated gif": (lambda p: _truncate(_gif(p.with_suffix(".gif"), _clip_frames(4))), "corrupt|truncated"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_video_file_is_a_bad_sample(tmp_path, case):
    make, reason = BROKEN[case]
    root = tmp_path / "set"
    _image(root / "train" / "k" / "good.png")
    _encode(root / "train" / "k" / "good.avi", "mpeg4", _clip_frames(3))
    _image(root / "train" / "k" / "bad.png")
    bad = make(root / "train" / "k" / "bad")
    with pytest.raises(BadSampleError, match=reason) as info:
        MultiModalFolder(root)
    assert info.value.bad[0][0] == str(bad) and str(bad) in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = MultiModalFolder(root, on_bad_sample="skip")
    assert len(ds) == 1 and ds.skipped[0][0] == str(bad)


def test_mp4_frames_is_kept_as_an_alias(tmp_path):
    clip = _encode(tmp_path / "c.webm", "vp8", _clip_frames(5))
    assert video_mod.mp4_frames is video_mod.video_frames
    images = video_mod.mp4_frames(clip, 2, "L")
    assert len(images) == 2 and images[0].mode == "L" and images[0].size == (W, H)
    assert video_mod.check_video(clip) == 5
    assert video_mod.is_video_file_name("x.WebM") and not video_mod.is_video_file_name(".x.mp4")
