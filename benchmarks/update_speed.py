"""Jitted optimizer-step time on a ResNet-18-shaped parameter tree, as ratios to optax.adam.

Run: ``python benchmarks/update_speed.py [--repeats 50]``. Prints one table; every time in it
comes from the same process, so the ratios compare like with like.

Two timings per optimizer, for fixed gradients:

- ``update``: ``jax.jit(opt.update)`` with the state donated; the updates are an output.
- ``step``: the optimizer's part of a training step: one jitted call that computes the
  updates and applies them, with the parameters and the state donated.
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


def _median_time(call, carry, repeats: int) -> float:
    for _ in range(3):  # compile and warm up
        carry = call(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(call(carry))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_update(opt: optax.GradientTransformation, params, grads, repeats: int) -> float:
    """Median seconds of ``jit(opt.update)`` with the state donated."""
    update = jax.jit(opt.update, donate_argnums=1)
    return _median_time(
        lambda carry: update(grads, carry[1], params), (None, opt.init(params)), repeats
    )


def time_step(opt: optax.GradientTransformation, params, grads, repeats: int) -> float:
    """Median seconds of one jitted update-and-apply, params and state donated."""

    def step(carry):
        params, state = carry
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.copy, params)  # the caller's arrays are not donated
    return _median_time(jax.jit(step, donate_argnums=0), (params, opt.init(params)), repeats)


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
    times = {
        name: (
            time_update(opt, params, grads, args.repeats),
            time_step(opt, params, grads, args.repeats),
        )
        for name, opt in optimizers.items()
    }
    device = jax.devices()[0]
    print(
        f"# optimizer time, {len(shapes)} leaves, {size:,} float32 parameters; "
        f"{device.platform}: {device.device_kind}; {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, optax {optax.__version__}; median of {args.repeats}"
    )
    adam_update, adam_step = times["optax.adam"]
    print("| optimizer | update ms | update vs adam | step ms | step vs adam |")
    print("|---|---:|---:|---:|---:|")
    for name, (update, step) in times.items():
        print(
            f"| {name} | {1e3 * update:.2f} | {update / adam_update:.2f}x "
            f"| {1e3 * step:.2f} | {step / adam_step:.2f}x |"
        )


if __name__ == "__main__":
    main()
