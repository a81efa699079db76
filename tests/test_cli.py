"""The `dtl-fast` command: help of every subcommand, clear errors for bad flags, `data demo`,
`data prepare`."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtl_fast import cli
from dtl_fast.train import TrainConfig


def _console_script() -> list[str]:
    """The venv's `dtl-fast` next to this Python, else `python -m dtl_fast.cli`."""
    script = Path(sys.executable).with_name("dtl-fast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dtl_fast.cli"]


def test_help_in_a_subprocess():
    res = subprocess.run([*_console_script(), "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: dtl-fast train")
    # every TrainConfig field is a flag, with its default shown where it has one
    for flag in ("--data", "--epochs", "--batch-size", "--lr", "--backend", "--amp", "--device",
                 "--seed", "--workers", "--out", "--resume", "--on-bad-sample", "--image-size",
                 "--max-frames", "--rnn", "--encoder", "--encoder-weights", "--no-baselines",
                 "--no-progress", "--width", "--hidden-size", "--dim", "--num-heads", "--num-layers"):
        assert flag in res.stdout, flag
    text = " ".join(res.stdout.split())
    for default in ("(default: 20)", "(default: 64)", "(default: 0.001)", "(default: fused)",
                    "(default: runs/dtl)", "(default: error)"):
        assert default in text, default


@pytest.mark.parametrize("argv, expect", [
    ([], "usage: dtl-fast"),
    (["info"], "usage: dtl-fast info"),
    (["demo"], "usage: dtl-fast demo"),
    (["train"], "usage: dtl-fast train"),
    (["evaluate"], "usage: dtl-fast evaluate"),
    (["data"], "usage: dtl-fast data"),
    (["data", "demo"], "usage: dtl-fast data demo"),
])
def test_help_of_each_subcommand(argv, expect, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(expect)
    if argv == []:
        for name in ("info", "demo", "train", "evaluate", "data"):
            assert name in out
    if argv == ["evaluate"]:
        assert "CHECKPOINT" in out and "--data" in out
        # evaluate takes what train takes for reading the data (the sizes come from the checkpoint)
        assert "--on-bad-sample {error,skip}" in out and "--no-progress" in out
        assert "(default: None)" not in out and "(default: True)" not in out
    if argv == ["data", "demo"]:
        assert "DIR" in out and "--seed" in out and "--overwrite" in out


def test_python_m_train_has_the_same_flags():
    from dtl_fast import train

    def options(parser):
        return {(opt, a.dest, repr(a.default), a.type, tuple(a.choices or ()))
                for a in parser._actions for opt in a.option_strings if opt != "-h"}

    sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and a.choices
               and "train" in a.choices)
    cli_opts, train_opts = options(sub.choices["train"]), options(train.build_parser())
    assert cli_opts == train_opts and len(cli_opts) >= 25
    # every TrainConfig field is reachable from a flag, with the dataclass's default
    defaults = {dest: default for _, dest, default, _, _ in cli_opts}
    for name, field in TrainConfig.__dataclass_fields__.items():
        assert name in defaults, name
        assert defaults[name] == repr(field.default), name


@pytest.mark.parametrize("flags, name", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--amp", "fp16"], "--amp"),
    (["--workers", "-2"], "--workers"),
    (["--device", "gpu"], "--device"),
    (["--data", "/definitely/not/here"], "--data"),
])
def test_bad_train_flags_exit_nonzero_naming_the_flag(flags, name, tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast train: error:") and name in err, err


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--backend", "fast"])
    assert exc.value.code == 2 and "--backend" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--epochs", "two"])
    assert exc.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["train", "--device", "cuda", "--data", str(tmp_path),
                     "--out", str(tmp_path / "run")]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_evaluate_missing_and_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "validation").mkdir()
    (tmp_path / "test").mkdir()
    missing = tmp_path / "missing.pt"
    assert cli.main(["evaluate", str(missing), "--data", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    assert cli.main(["evaluate", str(corrupt), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast evaluate: error:") and str(corrupt) in err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(corrupt)])  # --data is required
    assert "--data" in capsys.readouterr().err


def test_data_demo_builds_the_set(tmp_path, capsys):
    """`dtl-fast data demo DIR` builds the bundled digits set on disk (a small one here), and a
    second call finds it complete and leaves it alone."""
    from dtl_fast.data import SPLITS

    out = tmp_path / "demo"
    assert cli.main(["data", "demo", str(out), "--seed", "3", "--samples-per-class", "4"]) == 0
    assert str(out) in capsys.readouterr().out
    for split in SPLITS:
        classes = sorted(p.name for p in (out / split).iterdir() if p.is_dir())
        assert len(classes) == 10, (split, classes)
        images = list((out / split).glob("*/*.png"))
        assert images and all(p.with_suffix("").is_dir() for p in images), split
    first = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert cli.main(["data", "demo", str(out), "--seed", "3", "--samples-per-class", "4"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == first
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["data", "demo", str(blocker / "sub"), "--samples-per-class", "2"]) == 2
    assert "dtl-fast data demo: error:" in capsys.readouterr().err
    assert cli.main(["data", "demo", str(tmp_path / "x"), "--samples-per-class", "0"]) == 2
    assert "samples_per_class" in capsys.readouterr().err


def test_data_demo_overwrite_refuses_a_real_data_set(tmp_path, capsys):
    """--overwrite replaces an earlier demo build only: a user's data set (train/ validation/
    test/ without the demo marker) is refused, named, and the error does not suggest --overwrite."""
    data = tmp_path / "mine"
    for split in ("train", "validation", "test"):
        (data / split / "cats").mkdir(parents=True)
        (data / split / "cats" / "1.png").write_bytes(b"precious")
    for extra in (["--overwrite"], []):  # --overwrite used to delete it
        assert cli.main(["data", "demo", str(data), "--samples-per-class", "3", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dtl-fast data demo: error:") and str(data) in err and "train/" in err
        assert "--overwrite" not in err and "overwrite=True" not in err, err
    assert sorted(p.name for p in (data / "train").iterdir()) == ["cats"]
    assert (data / "test" / "cats" / "1.png").read_bytes() == b"precious"
    # an earlier demo build is what --overwrite is for
    demo = tmp_path / "demo"
    assert cli.main(["data", "demo", str(demo), "--samples-per-class", "3"]) == 0
    assert cli.main(["data", "demo", str(demo), "--samples-per-class", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["data", "demo", str(demo), "--samples-per-class", "4", "--overwrite"]) == 0


@pytest.fixture
def tiny_raw(tmp_path):
    from PIL import Image

    root = tmp_path / "raw"
    for split in ("train", "validation", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            (folder / "s").mkdir(parents=True)
            Image.new("RGB", (6, 6), (1, 2, 3)).save(folder / "s.png")
            Image.new("L", (6, 6), 7).save(folder / "s" / "0.png")
    return root


@pytest.mark.parametrize("flags, name", [
    (["--max-frames", "0"], "--max-frames"), (["--image-size", "0"], "--image-size"),
    (["--frame-size", "-1"], "--frame-size"), (["--workers", "-2"], "--workers"),
    (["--channels", "2"], "--channels"),
])
def test_data_prepare_errors_name_the_flag(flags, name, tiny_raw, tmp_path, capsys):
    assert cli.main(["data", "prepare", str(tiny_raw), str(tmp_path / "out"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast data prepare: error:") and name in err, err
    python_name = name[2:].replace("-", "_")  # the Python API's name, not the flag
    assert not re.search(rf"(?<![-\w]){python_name}\b", err), err
    assert not (tmp_path / "out").exists()


def test_data_prepare_hint_quotes_the_path(tiny_raw, tmp_path, capsys):
    import shlex

    out = tmp_path / "prepared ü x"
    assert cli.main(["data", "prepare", str(tiny_raw), str(out), "--image-size", "8",
                     "--max-frames", "2", "--no-progress"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("train on it with: dtl-fast train --data ")
    words = shlex.split(hint.split(": ", 1)[1])
    assert words[:4] == ["dtl-fast", "train", "--data", str(out)], words


def test_data_demo_through_a_symlink_and_prepare_over_a_users_prepared_json(tiny_raw, tmp_path, capsys):
    """`data demo LINK --overwrite` rebuilds in the link's target and keeps the link; `data
    prepare --overwrite` into a folder holding only a user's own prepared.json refuses, naming
    the file, and keeps it."""
    real, link = tmp_path / "real", tmp_path / "link"
    assert cli.main(["data", "demo", str(real), "--samples-per-class", "3"]) == 0
    link.symlink_to(real, target_is_directory=True)
    assert cli.main(["data", "demo", str(link), "--samples-per-class", "4", "--overwrite"]) == 0
    assert str(link) in capsys.readouterr().out
    assert link.is_symlink() and (real / "dtl_fast_demo.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "prepared.json").write_text('{"my": "notes"}')
    assert cli.main(["data", "prepare", str(tiny_raw), str(mine), "--image-size", "8",
                     "--max-frames", "2", "--no-progress", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtl-fast data prepare: error: refusing to write into OUT") and \
        str(mine / "prepared.json") in err, err
    assert (mine / "prepared.json").read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine", "raw", "real"]


def test_data_errors_name_the_path_as_typed_and_the_flag_not_the_keyword(tiny_raw, tmp_path, capsys):
    """`data prepare` named only a link OUT's target, and both commands said "pass
    overwrite=True (--overwrite)" (the Python API's keyword) on the command line."""
    out, link = tmp_path / "out", tmp_path / "lo"
    flags = ["--image-size", "8", "--max-frames", "2", "--no-progress"]
    assert cli.main(["data", "prepare", str(tiny_raw), str(out), *flags]) == 0
    link.symlink_to("out")
    capsys.readouterr()
    assert cli.main(["data", "prepare", str(tiny_raw), str(link), *flags]) == 2
    err = capsys.readouterr().err
    assert f"OUT {link} (a symbolic link to {out}) already holds" in err and "pass --overwrite" in err, err
    assert "overwrite=True" not in err, err
    demo = tmp_path / "demo"
    assert cli.main(["data", "demo", str(demo), "--samples-per-class", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "demo", str(demo), "--samples-per-class", "4"]) == 2
    err = capsys.readouterr().err
    assert "other parameters" in err and "pass --overwrite" in err and "overwrite=True" not in err, err
    # a loop of links: named, nothing created
    (tmp_path / "loop").symlink_to("loop")
    assert cli.main(["data", "prepare", str(tiny_raw), str(tmp_path / "loop"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dtl-fast data prepare: error: OUT {tmp_path / 'loop'}: its symbolic links "
                          "form a loop"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "lo", "loop", "out", "raw"]


def test_info_and_demo_still_parse():
    args = cli.build_parser().parse_args(["demo", "--batch", "8"])
    assert args.func is cli._cmd_demo and args.batch == 8 and args.max_len == 24
    args = cli.build_parser().parse_args(["info", "--json"])
    assert args.func is cli._cmd_info and args.json


@pytest.mark.parametrize("flags, name", [(["--batch", "0"], "--batch"), (["--max-len", "0"], "--max-len")])
def test_demo_flags_below_one_are_errors_naming_them(flags, name, capsys):
    """Before: torch's own error from inside the demo (min() of an empty tensor, random_)."""
    assert cli.main(["demo", *flags]) == 2
    assert capsys.readouterr().err == f"dtl-fast demo: error: {name} must be an integer >= 1, got 0\n"


@pytest.mark.parametrize("argv, package, prog", [
    (["demo"], "sklearn", "dtl-fast demo"),
    (["data", "demo", "DIR"], "sklearn", "dtl-fast data demo"),
    (["train", "--data", "DATA", "--epochs", "1"], "PIL", "dtl-fast train"),
    (["data", "prepare", "DATA", "OUT"], "PIL", "dtl-fast data prepare"),
])
def test_a_missing_optional_package_is_one_error_line(argv, package, prog, tiny_raw, tmp_path,
                                                      monkeypatch, capsys):
    """scikit-learn (the demos' digits) and Pillow (every sample's image) missing: one line
    naming what to install and exit status 2, as for torchvision / PyAV (before: a traceback;
    without Pillow after the data check had passed on a remembered manifest)."""
    from dtl_fast.data import demo as demo_data

    monkeypatch.setitem(sys.modules, package, None)
    if package == "sklearn":  # the data demo reads the bundled file without importing sklearn
        monkeypatch.setattr(demo_data.importlib.util, "find_spec", lambda name: None)
    argv = [str(tiny_raw) if a == "DATA" else str(tmp_path / "d") if a == "DIR" else
            str(tmp_path / "o") if a == "OUT" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and "pip install" in err and err.count("\n") == 1, err
