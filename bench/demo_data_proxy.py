"""How hard is the demo data set? A logistic-regression proxy for the issue-5 figure.

The trained models are CNNs; this is a seconds-long stand-in: logistic regression on
(a) the flattened image, (b) the mean over the clip's frames, (c) both concatenated, trained on
the train split and scored on the test split (and on validation + test, for a steadier
figure). The demo set is tuned so that each view alone is clearly imperfect and the
concatenation is well above the better single view.

    python bench/demo_data_proxy.py                      # the defaults of build_demo_dataset
    python bench/demo_data_proxy.py image_noise=0.3 video_occluder=10
"""
from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time

import numpy as np

from dtl_fast.data.demo import build_demo_dataset, render_demo_samples


def default_params(**overrides) -> dict:
    sig = inspect.signature(build_demo_dataset)
    params = {k: p.default for k, p in sig.parameters.items() if k not in ("root", "overwrite")}
    params.update(overrides)
    params["split_fractions"] = list(params["split_fractions"])
    return params


def features(params: dict):
    splits, labels, image_f, video_f = [], [], [], []
    for split, label, _, image, clip in render_demo_samples(params):
        # the same 8-bit rounding as the PNG files
        image = np.round(image * 255) / 255
        clip = np.round(clip * 255) / 255
        splits.append(split)
        labels.append(label)
        image_f.append(image.ravel())
        video_f.append(clip.mean(0).ravel())
    return np.array(splits), np.array(labels), np.array(image_f), np.array(video_f)


def proxy(params: dict, C: float = 0.03) -> dict:
    from sklearn.linear_model import LogisticRegression

    splits, y, xi, xv = features(params)
    train = splits == "train"
    out = {}
    for name, x in (("image", xi), ("video", xv), ("both", np.hstack([xi, xv]))):
        model = LogisticRegression(C=C, max_iter=3000).fit(x[train], y[train])
        for held, mask in (("test", splits == "test"), ("val+test", ~train)):
            out[f"{name}/{held}"] = float((model.predict(x[mask]) == y[mask]).mean())
    return out


def main(argv: list[str]) -> int:
    known = default_params()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="keys (build_demo_dataset's parameters, with their defaults): "
               + ", ".join(f"{k}={v!r}" for k, v in known.items()))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="a parameter of build_demo_dataset and a Python literal for it")
    overrides = {}
    for arg in parser.parse_args(argv).overrides:
        key, eq, value = arg.partition("=")
        if not eq or key not in known:
            parser.error(f"{arg!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            overrides[key] = ast.literal_eval(value)  # numbers and tuples, nothing executed
        except (ValueError, SyntaxError, TypeError):  # TypeError: e.g. an unhashable dict key
            parser.error(f"{arg!r}: the value must be a Python literal (a number, a tuple, ...)")
    params = default_params(**overrides)
    t0 = time.perf_counter()
    res = proxy(params)
    print(f"logistic-regression proxy ({time.perf_counter() - t0:.1f} s), overrides {overrides or 'none'}")
    for held in ("test", "val+test"):
        i, v, b = res[f"image/{held}"], res[f"video/{held}"], res[f"both/{held}"]
        print(f"  {held:>8}: image {i:.1%}  video {v:.1%}  both {b:.1%}  "
              f"(both - better single: {100 * (b - max(i, v)):+.1f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
