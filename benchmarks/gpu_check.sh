#!/usr/bin/env bash
# All GPU checks in one run, for a lent GPU machine with little time (see docs/benchmarks.md).
#
#   bash benchmarks/gpu_check.sh [extra train_throughput.py flags]
#
# Writes gpu.txt, train_throughput.log and update_speed.log to $OUT (default /tmp/gpu-check).
# Needs the real data at .data/cifar10-jpeg.tar.xz (CIFAR-10 as an image-folder archive,
# train/<class>/*.jpg and test/<class>/*.jpg; .data/ is ignored by git). Where the machine's flax or optax is missing or older than this project
# needs, wheels in .whl/ (ignored; `pip download --no-deps flax==0.12.8 optax==0.2.8 -d .whl`)
# are installed into /tmp/site first. On CPU, `--width 4 --epochs 1` makes a quick dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"

if ! python3 - <<'EOF'
import sys
from importlib.metadata import version
need = {"flax": (0, 12), "optax": (0, 2, 5)}
try:
    ok = all(tuple(int(p) for p in version(n).split(".")[:len(v)]) >= v for n, v in need.items())
except Exception:
    ok = False
sys.exit(0 if ok else 1)
EOF
then
  echo "installing .whl/*.whl into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

status=0
timeout 420 python3 benchmarks/train_throughput.py --data .data/cifar10-jpeg.tar.xz "$@" \
  2>&1 | tee "$OUT/train_throughput.log" || status=1
timeout 240 python3 benchmarks/update_speed.py --repeats 30 2>&1 | tee "$OUT/update_speed.log" \
  || status=1
exit "$status"
