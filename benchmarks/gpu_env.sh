# Sourced by the GPU scripts (gpu_check.sh, reproduce_gpu.sh): the repository on PYTHONPATH,
# unbuffered output, the card's name in $OUT/gpu.txt, and flax/optax from .whl/ where the
# machine's are missing or older than this project needs (wheels in .whl/, ignored by git:
# `pip download --no-deps flax==0.12.8 optax==0.2.8 -d .whl`, installed into /tmp/site).
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"

if ! python3 - <<'PY'
import sys
from importlib.metadata import version
need = {"flax": (0, 12), "optax": (0, 2, 5)}
try:
    ok = all(tuple(int(p) for p in version(n).split(".")[:len(v)]) >= v for n, v in need.items())
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
then
  echo "installing .whl/*.whl into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
