#!/usr/bin/env bash
# The user's install, checked: build the wheel, install it (not editable) into a fresh venv
# outside the source tree, and from a folder outside the tree run what a user runs first:
# `dtl-fast info`, `dtl-fast data demo` (tiny), a `dtl-fast train` of exactly two steps and
# `dtl-fast evaluate` of its checkpoint. The tests run against the editable install, which
# imports from the source tree and so cannot see a module the wheel leaves out.
#
# The heavy dependencies (torch, triton, ...) are not downloaded again: the fresh venv reads
# the dev venv's site-packages through a .pth file. A path line in a .pth file only appends that
# folder to sys.path; the .pth files inside it (among them the editable install's finder hook)
# are not run, and the fresh venv's own site-packages comes first, so `dtl_fast` resolves to the
# installed wheel. The check asserts that, for every dtl_fast module loaded.
#
# Usage: bash .ci/wheel_check.sh      (make wheel-check)
#   PYTHON   the interpreter with torch and the build tools (default: <repo>/.venv/bin/python)
#   KEEP=1   keep the temporary folder (wheel, venv, data, run outputs) for a look afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
fail() { echo "wheel check FAILED: $*" >&2; exit 1; }
step() { echo "== wheel check: $*"; }
[ -x "$PY" ] || fail "no Python at $PY (run \`make install\` first, or set PYTHON)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dtl_fast_wheel.XXXXXX")
case "$WORK/" in "$ROOT"/*) fail "the temporary folder $WORK lies inside the source tree; set TMPDIR elsewhere";; esac
if [ "${KEEP:-0}" = 1 ]; then trap 'echo "wheel check: kept $WORK"' EXIT; else trap 'rm -rf "$WORK"' EXIT; fi
T0=$SECONDS

# 1. The wheel. build/lib* goes first: setuptools copies into it but never deletes, so a module
# removed or moved in the tree (dtl_fast/train.py -> dtl_fast/train/) would ship from there.
# build/temp (the compiled objects, shared with `make install`) stays: ninja recompiles only
# what changed.
step "building the wheel"
rm -rf "$ROOT"/build/lib "$ROOT"/build/lib.* "$ROOT"/build/bdist.*
(cd "$ROOT" && "$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" .) \
    > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "pip wheel failed (log above)"; }
shopt -s nullglob
wheels=("$WORK"/dist/dtl_fast-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one dtl_fast wheel in $WORK/dist, found ${#wheels[@]}"
WHEEL=${wheels[0]}
T_BUILD=$((SECONDS - T0))
echo "wheel: $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB, built in ${T_BUILD} s)"

# 1b. The build's metadata, with the setuptools that built it: a SetuptoolsDeprecationWarning
# carries a date after which that build stops working (the license as a TOML table did, until
# 2027-02-18), so it fails here first, while the build still works. The wheel's METADATA must
# name the license that setup.py gives, and carry its text (LICENSE).
step "the build's metadata (no setuptools deprecation)"
mkdir -p "$WORK/meta"
(cd "$ROOT" && "$PY" -c 'import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))' \
    "$WORK/meta") > "$WORK/meta.log" 2>&1 || { tail -40 "$WORK/meta.log" >&2; fail "setuptools could not prepare the metadata (log above)"; }
if grep -q "SetuptoolsDeprecationWarning" "$WORK/meta.log"; then
    grep -A12 "SetuptoolsDeprecationWarning" "$WORK/meta.log" >&2
    fail "setuptools deprecates part of this build (above): fix it before its date"
fi
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel's METADATA does not name the license or carry its text (above)"
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
lines = z.read(meta[0]).decode().splitlines() if len(meta) == 1 else []
if "License: MIT" not in lines:
    sys.exit(f"no 'License: MIT' line in {meta}")
# the license's text travels with the wheel (setuptools' default license_files pattern)
if "License-File: LICENSE" not in lines:
    sys.exit(f"no 'License-File: LICENSE' line in {meta}")
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
           for n in z.namelist()):
    sys.exit("the wheel holds no LICENSE file in its .dist-info")
EOF

# 2. Its contents: every package of the tree (kernels/ as dtl_fast/kernels/) and the extension.
"$PY" - "$ROOT" "$WHEEL" <<'EOF' || fail "the wheel does not hold the whole package (above)"
import os, sys, zipfile
root, wheel = sys.argv[1:]
names = set(zipfile.ZipFile(wheel).namelist())
want = []
for top, into in (("dtl_fast", "dtl_fast"), ("kernels", "dtl_fast/kernels")):
    for d, dirs, files in os.walk(os.path.join(root, top)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        rel = os.path.relpath(d, os.path.join(root, top))
        for f in files:
            if f.endswith(".py"):
                want.append(os.path.normpath(os.path.join(into, rel, f)).replace(os.sep, "/"))
missing = sorted(set(want) - names)
if missing:
    print("missing from the wheel:", *missing, sep="\n  ", file=sys.stderr)
    sys.exit(1)
if not any(n.startswith("dtl_fast/_C.") and n.endswith(".so") for n in names):
    sys.exit("the wheel has no dtl_fast/_C extension")
if any(n.startswith("kernels/") for n in names):
    sys.exit("the wheel installs a top-level `kernels` package")
print(f"wheel holds all {len(want)} modules of the tree and dtl_fast/_C")
EOF

# 3. A fresh venv outside the tree, the wheel installed into it (no index, no dependencies:
# they come from the dev venv below), then the .pth to the dev venv's site-packages.
step "installing it into a fresh venv"
"$PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
"$PY" -m pip --python "$VPY" install --quiet --no-index --no-deps "$WHEEL" \
    || fail "pip could not install $WHEEL into $WORK/venv"
DEPS=$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u)
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$DEPS" > "$SITE/_dtl_fast_wheel_check_deps.pth"
"$PY" -m pip --python "$VPY" check || fail "the dependencies the wheel declares are not all installed"

export PATH="$WORK/venv/bin:$PATH"
export DTL_FAST_CACHE="$WORK/cache"  # the data-check manifests go with $WORK, not into ~/.cache
unset PYTHONPATH PYTHONHOME DTL_FAST_BACKEND
mkdir -p "$WORK/run"
cd "$WORK/run"
[ "$(command -v dtl-fast)" = "$WORK/venv/bin/dtl-fast" ] \
    || fail "dtl-fast resolves to $(command -v dtl-fast), not the fresh venv's"

# 4. Where dtl_fast comes from: every module of the installed package imports, from the fresh
# venv (the extension too), none from the source tree or through the editable install's finder.
"$VPY" - "$SITE" <<'EOF' || fail "dtl_fast does not import from the installed wheel (above)"
import importlib, pathlib, pkgutil, sys
site = pathlib.Path(sys.argv[1]).resolve()
import dtl_fast, dtl_fast._C
names = [m.name for m in pkgutil.walk_packages(dtl_fast.__path__, "dtl_fast.")
         if not m.name.endswith("__main__")]  # a __main__ module runs its command on import
for name in names:
    importlib.import_module(name)
bad = {n: m.__file__ for n, m in sys.modules.items()
       if n.split(".")[0] == "dtl_fast" and getattr(m, "__file__", None)
       and site not in pathlib.Path(m.__file__).resolve().parents}
if bad:
    sys.exit(f"imported from outside the fresh venv's {site}:\n  "
             + "\n  ".join(f"{n}: {f}" for n, f in sorted(bad.items())))
if any(n.startswith("__editable__") for n in sys.modules):
    sys.exit("the editable install's finder of the dev venv is active in the fresh venv")
print(f"dtl_fast {dtl_fast.__version__}: {len(names) + 1} modules imported from "
      f"{pathlib.Path(dtl_fast.__file__).parent}, extension {pathlib.Path(dtl_fast._C.__file__).name}")
EOF

step "dtl-fast info"
dtl-fast info || fail "\`dtl-fast info\` failed"

step "dtl-fast data demo (3 digits per class)"
dtl-fast data demo data --samples-per-class 3 || fail "\`dtl-fast data demo\` failed"
# Two steps: the batch size is half the training split (rounded up), whatever the split gives.
N_TRAIN=$(find data/train -mindepth 2 -maxdepth 2 -name '*.png' | wc -l)
[ "$N_TRAIN" -ge 2 ] || fail "the demo data has $N_TRAIN training images (data/train/<class>/*.png), expected 2 or more"
BATCH=$(((N_TRAIN + 1) / 2))

step "dtl-fast train: 1 epoch of $N_TRAIN samples in batches of $BATCH (2 steps)"
T1=$SECONDS
dtl-fast train --data data --out out --epochs 1 --batch-size "$BATCH" --device cpu --no-progress \
    --image-size 16 --max-frames 4 --width 8 --hidden-size 16 --dim 16 --num-heads 2 --num-layers 1 \
    || fail "\`dtl-fast train\` failed"
[ -f out/checkpoint.pt ] || fail "\`dtl-fast train\` wrote no out/checkpoint.pt"
T_TRAIN=$((SECONDS - T1))

step "dtl-fast evaluate out/checkpoint.pt"
dtl-fast evaluate out/checkpoint.pt --data data --device cpu || fail "\`dtl-fast evaluate\` failed"

echo "wheel check passed: built in ${T_BUILD} s, train ${T_TRAIN} s, all in $((SECONDS - T0)) s ($WORK)"
