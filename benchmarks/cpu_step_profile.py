"""Where XLA:CPU spends the trainer's training step: a profile summed by operation kind.

Run: ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/cpu_step_profile.py
[--width 32]``.

Times the forward pass and the forward and backward pass of the trainer's loss (ResNet-18,
batch 128, float32, BatchNorm in training mode), then traces two forward-and-backward calls
with ``jax.profiler`` and sums the XLA:CPU kernel events by name (``ynn_fusion.12`` counts
as ``ynn_fusion``), as shares of the kernel time of all threads.
"""

import argparse
import collections
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src.lib import _profile_data

from train import data as data_lib
from train.config import Config
from train.trainer import init_model

BATCH = 128


def _median_ms(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    config = Config(model="resnet18", width=args.width, batch_size=BATCH, data="synthetic")
    model, params, stats = init_model(config, 10)
    pixels = np.random.default_rng(0).integers(0, 255, (BATCH, 32, 32, 3), dtype=np.uint8)
    images = data_lib.preprocess_eval(jnp.asarray(pixels))
    labels = jnp.zeros(BATCH, jnp.int32)

    def loss_fn(params, stats, images):
        net = model.merge(params, stats)
        net.train()
        return optax.softmax_cross_entropy_with_integer_labels(net(images), labels).mean()

    forward, gradient = jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn))
    print(f"# ResNet-18 width {args.width}, batch {BATCH}, float32; jax {jax.__version__}")
    print(f"forward: {_median_ms(forward, params, stats, images):.0f} ms")
    print(f"forward and backward: {_median_ms(gradient, params, stats, images):.0f} ms")

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(2):
                jax.block_until_ready(gradient(params, stats, images))
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        profile = _profile_data.ProfileData.from_file(str(trace))
    kernel_ms, count = collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end: ")):
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                kernel_ms[kind] += event.duration_ns / 1e6 / 2
                count[kind] += 1
    total = sum(kernel_ms.values())
    if not total:
        raise SystemExit("no kernel events: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    print("| kernel kind | ms per step, all threads | share | kernels per step |")
    print("|---|---:|---:|---:|")
    for kind, ms in kernel_ms.most_common(args.top):
        print(f"| `{kind}` | {ms:.1f} | {100 * ms / total:.1f}% | {count[kind] // 2} |")


if __name__ == "__main__":
    main()
