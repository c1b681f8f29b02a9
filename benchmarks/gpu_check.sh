#!/usr/bin/env bash
# All GPU checks in one run, for a lent GPU machine with little time (see docs/benchmarks.md).
#
#   bash benchmarks/gpu_check.sh [extra train_throughput.py flags]
#
# Writes gpu.txt, train_throughput.log and update_speed.log to $OUT (default /tmp/gpu-check).
# Needs the real data at .data/cifar10-jpeg.tar.xz (CIFAR-10 as an image-folder archive,
# train/<class>/*.jpg and test/<class>/*.jpg; .data/ is ignored by git). Where the machine's
# flax or optax is missing or too old, benchmarks/gpu_env.sh installs them from .whl/.
# On CPU, `--data synthetic --width 4 --epochs 2 --synthetic-size 256 64` makes a dry run.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

status=0
timeout 420 python3 benchmarks/train_throughput.py --data .data/cifar10-jpeg.tar.xz "$@" \
  2>&1 | tee "$OUT/train_throughput.log" || status=1
timeout 240 python3 benchmarks/update_speed.py --repeats 30 2>&1 | tee "$OUT/update_speed.log" \
  || status=1
exit "$status"
