#!/usr/bin/env bash
# The published ResNet-18 comparison on one lent GPU, in one go: each optimizer's 200-epoch
# reference recipe (python -m train.cifar, docs/reproducing.md) runs
# as its own process, all at once, each with a share of the GPU's memory.
#
#   OUT=... bash benchmarks/reproduce_gpu.sh [--opts swats_local,swats_global,adabound]
#       [--seconds 540] [--fraction 0.3] [more python -m train.cifar flags, e.g. --dtype bfloat16]
#
# Needs .data/cifar10-jpeg.tar.xz as gpu_check.sh does. Each run is stopped (as by Ctrl-C, at
# a step boundary, its finished epochs kept) after --seconds. Every 20 s, and at the end, the
# runs' small outputs (config.json, metrics.jsonl, switches.md/csv, rates.csv, the log, and
# at the end the plots) are packed into $OUT/results.tgz, so that what ran comes back even if
# the machine is taken away; the checkpoints stay in /tmp (too large to bring back). Writes
# $OUT/gpu.txt and $OUT/results.tgz (unpack: tar xzf results.tgz -> runs/<opt>-r18/...).
# On CPU, `--seconds 120 --data synthetic --width 4 --epochs 1 --synthetic-size 256 64` makes
# a dry run.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

opts=swats_local,swats_global,adabound
seconds=540
fraction=0.3
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --opts) opts=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --fraction) fraction=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

work=/tmp/reproduce
mkdir -p "$work/runs"
pack() {  # the small files of every run, replaced atomically
  (cd "$work" && find runs -maxdepth 2 -type f \( -name '*.json' -o -name '*.jsonl' \
      -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.png' \) -print0 \
    | tar czf "$OUT/results.tgz.tmp" --null -T - && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz")
}

pids=()
for opt in ${opts//,/ }; do
  run="$work/runs/$opt-r18"
  mkdir -p "$run"
  echo "starting $opt: python -m train.cifar --opt=$opt --model=resnet18 --workdir=$run ${extra[*]}"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction timeout -s INT -k 30 "$seconds" \
    python3 -m train.cifar --opt="$opt" --model=resnet18 --data=.data/cifar10-jpeg.tar.xz \
      --workdir="$run" --cache-dir="$work/cache-$opt" --keep-checkpoints=1 "${extra[@]}" \
      > "$run/train.log" 2>&1 &
  pids+=($!)
done

while kill -0 "${pids[@]}" 2>/dev/null; do
  sleep 20
  pack
  for run in "$work"/runs/*; do echo "$(basename "$run"): $(tail -n 1 "$run/train.log")"; done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

for run in "$work"/runs/*; do
  python3 -m train.plots --out "$run/test_accuracy.png" "$run" || status=1
  if [[ "$(basename "$run")" == swats* ]]; then
    python3 -m train.plots --switches --out "$run/switches.png" "$run" || status=1
    python3 -m train.plots --rates "$run" || status=1
  fi
done
python3 -m train.plots --each-run --out "$work/runs/test_accuracy.png" "$work"/runs/*/ || status=1
pack
tar tzf "$OUT/results.tgz"
exit "$status"
