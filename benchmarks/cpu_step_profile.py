"""Where XLA:CPU spends the trainer's training step: a profile summed by operation kind.

Run: ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/cpu_step_profile.py
[--width 32]``.

Times the forward pass and the forward and backward pass of the trainer's loss (ResNet-18,
batch 128, float32, BatchNorm in training mode) under the trainer's own XLA:CPU options
(``train/xla_cpu.py``), then traces two forward-and-backward calls with ``jax.profiler`` and
sums the XLA:CPU kernel events by name (``ynn_fusion.12`` counts as ``ynn_fusion``), as
shares of the kernel time of all threads. Kernels that XLA:CPU hands to Eigen's own thread
pool (its convolutions, under the trainer's options) are not traced.

Last, the forward and backward pass with and without BatchNorm (every BatchNorm an identity:
convolutions, ReLU, pooling and the linear layer remain), here and for the independent
PyTorch ResNet-18 of ``tests/torch_models.py``: how the gap to PyTorch splits between the
convolutions and the rest.
"""

import argparse
import collections
import contextlib
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from train import xla_cpu

xla_cpu.tune()  # before JAX computes anything: the trainer's own XLA:CPU options

import cpu_train_speed  # noqa: E402  (beside this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

from train import data as data_lib  # noqa: E402
from train import models  # noqa: E402
from train.config import Config  # noqa: E402
from train.trainer import init_model  # noqa: E402

BATCH = 128


def _median_ms(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class _NoNorm(nnx.Module):
    """An identity in BatchNorm's place."""

    def __call__(self, x, use_running_average=None):
        return x


def _gradient(config: Config, without_batchnorm: bool = False):
    """The jitted value-and-gradient of the trainer's loss, its arguments."""
    no_norm = mock.patch.object(models, "_batch_norm", lambda *args, **kwargs: _NoNorm())
    with no_norm if without_batchnorm else contextlib.nullcontext():
        model, params, stats = init_model(config, 10)
    pixels = np.random.default_rng(0).integers(0, 255, (BATCH, 32, 32, 3), dtype=np.uint8)
    images = data_lib.preprocess_eval(jnp.asarray(pixels))
    labels = jnp.zeros(BATCH, jnp.int32)

    def loss_fn(params, stats, images):
        net = model.merge(params, stats)
        net.train()
        return optax.softmax_cross_entropy_with_integer_labels(net(images), labels).mean()

    return jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn)), (params, stats, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    config = Config(model="resnet18", width=args.width, batch_size=BATCH, data="synthetic")
    forward, gradient, (params, stats, images) = _gradient(config)
    print(
        f"# ResNet-18 width {args.width}, batch {BATCH}, float32; jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
    )
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

    import torch

    threads = os.cpu_count()
    print(f"\nforward and backward, ms (median); torch {torch.__version__}, {threads} threads")
    print("| | with BatchNorm | without BatchNorm |")
    print("|---|---:|---:|")
    jax_ms = []
    for without in (False, True):
        _, gradient, arguments = _gradient(config, without)
        jax_ms.append(_median_ms(gradient, *arguments, repeats=4))
    torch_ms = [
        1000 * cpu_train_speed.pytorch_step_s(args.width, 4, optimizer=False, without_batchnorm=b)
        for b in (False, True)
    ]
    print(f"| trainer (JAX) | {jax_ms[0]:.0f} | {jax_ms[1]:.0f} |")
    print(f"| PyTorch | {torch_ms[0]:.0f} | {torch_ms[1]:.0f} |")
    print(f"| JAX / PyTorch | {jax_ms[0] / torch_ms[0]:.2f}x | {jax_ms[1] / torch_ms[1]:.2f}x |")


if __name__ == "__main__":
    main()
