#!/usr/bin/env bash
# The GPU check in one device call, from the repository root:
#   (here, once)   bash benchmarks/gpu_wheels.sh
#   (device call)  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels into /tmp/site (the image lacks tensorly, tensorly-torch, lpips,
# av, mlxtend), then runs benchmarks/gpu_check.py, which writes $OUT/gpu_check.json and .md
# within its 450 s budget. Extra arguments go to gpu_check.py (e.g. --dry-run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
