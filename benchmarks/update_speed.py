"""Jitted optimizer-update time on a ResNet-18-shaped parameter tree, as ratios to optax.adam.

Run: ``python benchmarks/update_speed.py [--repeats 50]``. Prints one table; every time in it
comes from the same process, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import swats_jax

RESNET18_LEAVES = 62
RESNET18_PARAMS = 11_173_962


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the CIFAR ResNet-18 (NHWC kernels), by readable path."""
    shapes = {"conv1/kernel": (3, 3, 3, 64), "bn1/scale": (64,), "bn1/bias": (64,)}
    in_width = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}/{block}"
            block_in = in_width if block == 0 else width
            shapes[f"{prefix}/conv1/kernel"] = (3, 3, block_in, width)
            shapes[f"{prefix}/conv2/kernel"] = (3, 3, width, width)
            for bn in ("bn1", "bn2"):
                shapes[f"{prefix}/{bn}/scale"] = shapes[f"{prefix}/{bn}/bias"] = (width,)
            if block_in != width:
                shapes[f"{prefix}/shortcut/conv/kernel"] = (1, 1, block_in, width)
                shapes[f"{prefix}/shortcut/bn/scale"] = (width,)
                shapes[f"{prefix}/shortcut/bn/bias"] = (width,)
        in_width = width
    shapes["linear/kernel"] = (512, 10)
    shapes["linear/bias"] = (10,)
    return shapes


def time_update(opt: optax.GradientTransformation, params, grads, repeats: int) -> float:
    """Median seconds of one jitted update (state donated, as in a training step)."""
    state = opt.init(params)
    update = jax.jit(opt.update, donate_argnums=1)
    for _ in range(3):  # compile and warm up
        updates, state = update(grads, state, params)
    jax.block_until_ready(updates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        updates, state = update(grads, state, params)
        jax.block_until_ready((updates, state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    shapes = resnet18_shapes()
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {k: jax.random.normal(key, s) * 0.05 for key, (k, s) in zip(keys, shapes.items())}
    grads = jax.tree.map(lambda p: 0.01 * jnp.tanh(p), params)
    size = sum(p.size for p in jax.tree.leaves(params))
    assert len(shapes) == RESNET18_LEAVES and size == RESNET18_PARAMS, (len(shapes), size)

    optimizers = {
        "optax.adam": optax.adam(1e-3),
        "optax.sgd": optax.sgd(0.1),
        "optax.sgd(momentum=0.9)": optax.sgd(0.1, momentum=0.9),
        "swats_local": swats_jax.swats_local(),
        "swats_global": swats_jax.swats_global(),
        "adabound": swats_jax.adabound(),
    }
    times = {name: time_update(opt, params, grads, args.repeats) for name, opt in optimizers.items()}
    device = jax.devices()[0]
    print(
        f"# update time, {len(shapes)} leaves, {size:,} float32 parameters; "
        f"{device.platform}: {device.device_kind}; {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, optax {optax.__version__}; median of {args.repeats}"
    )
    print("| optimizer | ms / update | vs optax.adam |")
    print("|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / times['optax.adam']:.2f}x |")


if __name__ == "__main__":
    main()
