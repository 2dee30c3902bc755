#!/usr/bin/env bash
# Build .whl/: the wheels the GPU machine's image lacks (tensorly, tensorly-torch, lpips, av,
# mlxtend), for its Python 3.12 on x86-64, without their dependencies (the image has numpy,
# scipy, torch, torchvision, tqdm, pandas, scikit-learn, matplotlib, joblib). Run it here,
# once, from the repository root; .whl/ is ignored by git (.git/info/exclude) and travels with
# a device call that names it in `carry` (see benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PYTHON="${PYTHON:-python3}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# One version of each (two stop the install there); pure-Python wheels match any platform.
for package in tensorly tensorly-torch lpips av mlxtend; do
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$package"
done
ls -l .whl
du -sh .whl
