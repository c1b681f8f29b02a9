"""Optimizer compile and step time on ResNet-18 and DenseNet-121 trees, as ratios to optax.adam.

Run: ``python benchmarks/update_speed.py [--repeats 30] [--trees resnet18,densenet121]``.
Prints one table per parameter tree; every time in a table comes from the same process, so the
ratios compare like with like.

For fixed gradients, per optimizer:

- ``compile``: tracing, lowering and compiling ``jax.jit(step)``, where ``step(params, state,
  grads)`` is ``opt.update`` followed by ``optax.apply_updates`` (what a training step pays
  before its first call, on top of the model).
- ``update``: ``jax.jit(opt.update)`` with the state donated; the updates are an output.
- ``step``: that update-and-apply, jitted, parameters and state donated.
- ``step, not donated``: the same without donation.

The row ``optax.adam + switch sums`` is a reference, not an optimizer of this project: Adam
followed by the two sums per leaf that the SWATS switch test needs (``u·g`` and ``u·u`` of
the update ``u``), kept in the state and nothing else. It shows what those sums alone cost
next to Adam on the backend at hand, the floor for any SWATS written with per-leaf state.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import swats_jax

Shapes = dict[str, tuple[int, ...]]


def resnet18_shapes() -> Shapes:
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


def densenet121_shapes(growth: int = 32) -> Shapes:
    """Parameter shapes of the CIFAR DenseNet-121 (DenseNet-BC, 4 blocks of 6/12/24/16)."""
    features = 2 * growth
    shapes: Shapes = {"conv1/kernel": (3, 3, 3, features)}
    for stage, size in enumerate((6, 12, 24, 16), start=1):
        for layer in range(size):
            prefix = f"dense{stage}/{layer}"
            shapes[f"{prefix}/bn1/scale"] = shapes[f"{prefix}/bn1/bias"] = (features,)
            shapes[f"{prefix}/conv1/kernel"] = (1, 1, features, 4 * growth)
            shapes[f"{prefix}/bn2/scale"] = shapes[f"{prefix}/bn2/bias"] = (4 * growth,)
            shapes[f"{prefix}/conv2/kernel"] = (3, 3, 4 * growth, growth)
            features += growth
        if stage < 4:
            shapes[f"trans{stage}/bn/scale"] = shapes[f"trans{stage}/bn/bias"] = (features,)
            shapes[f"trans{stage}/conv/kernel"] = (1, 1, features, math.floor(features / 2))
            features = math.floor(features / 2)
    shapes["bn/scale"] = shapes["bn/bias"] = (features,)
    shapes["linear/kernel"] = (features, 10)
    shapes["linear/bias"] = (10,)
    return shapes


# (leaves, parameters) of the models in train.models, checked against the shapes above.
TREES: dict[str, tuple[Callable[[], Shapes], int, int]] = {
    "resnet18": (resnet18_shapes, 62, 11_173_962),
    "densenet121": (densenet121_shapes, 362, 6_956_298),
}


def with_switch_sums(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, plus the sums ``u·g`` and ``u·u`` of its update ``u`` per leaf, in the state."""

    def init_fn(params):
        return inner.init(params), jax.tree.map(lambda _: jnp.zeros([2], jnp.float32), params)

    def update_fn(grads, state, params=None):
        updates, inner_state = inner.update(grads, state[0], params)
        sums = jax.tree.map(
            lambda u, g: jnp.stack([jnp.sum(u * g), jnp.sum(u * u)]), updates, grads
        )
        return updates, (inner_state, sums)

    return optax.GradientTransformation(init_fn, update_fn)


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adam": optax.adam(1e-3),
        "optax.adam + switch sums": with_switch_sums(optax.adam(1e-3)),
        "optax.sgd": optax.sgd(0.1),
        "optax.sgd(momentum=0.9)": optax.sgd(0.1, momentum=0.9),
        "swats_local": swats_jax.swats_local(),
        "swats_global": swats_jax.swats_global(),
        "adabound": swats_jax.adabound(),
    }


def _apply(opt: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def compile_seconds(opt: optax.GradientTransformation, params, grads) -> float:
    """Seconds to trace, lower and compile the update-and-apply step (nothing cached)."""
    state = jax.eval_shape(opt.init, params)
    start = time.perf_counter()
    jax.jit(_apply(opt)).lower(params, state, grads).compile()
    return time.perf_counter() - start


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


def time_step(
    opt: optax.GradientTransformation, params, grads, repeats: int, donate: bool = True
) -> float:
    """Median seconds of one jitted update-and-apply, params and state donated or not."""
    step = jax.jit(_apply(opt), donate_argnums=(0, 1) if donate else ())
    params = jax.tree.map(jnp.copy, params)  # the caller's arrays are not donated
    return _median_time(lambda carry: step(*carry, grads), (params, opt.init(params)), repeats)


def make_tree(name: str) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Random float32 parameters of tree ``name`` (sizes checked) and fixed gradients."""
    shapes_fn, num_leaves, num_params = TREES[name]
    shapes = shapes_fn()
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {k: jax.random.normal(key, s) * 0.05 for key, (k, s) in zip(keys, shapes.items())}
    grads = jax.tree.map(lambda p: 0.01 * jnp.tanh(p), params)
    size = sum(p.size for p in jax.tree.leaves(params))
    assert (len(shapes), size) == (num_leaves, num_params), (len(shapes), size)
    return params, grads


def benchmark_tree(name: str, repeats: int) -> None:
    params, grads = make_tree(name)
    size = sum(p.size for p in jax.tree.leaves(params))

    opts = optimizers()
    # Compile first, each optimizer once: later timings reuse what jax traced for it.
    compiles = {n: compile_seconds(opt, params, grads) for n, opt in opts.items()}
    rows = {
        n: (
            compiles[n],
            time_update(opt, params, grads, repeats),
            time_step(opt, params, grads, repeats),
            time_step(opt, params, grads, repeats, donate=False),
        )
        for n, opt in opts.items()
    }
    device = jax.devices()[0]
    print(
        f"\n# {name}: {len(params)} leaves, {size:,} float32 parameters; "
        f"{device.platform}: {device.device_kind}; {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, optax {optax.__version__}; times: median of {repeats}"
    )
    adam = rows["optax.adam"]
    print(
        "| optimizer | compile s | vs adam | update ms | vs adam | step ms | vs adam "
        "| step, not donated, ms | vs adam |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, row in rows.items():
        cells = [
            f"{value * scale:.2f} | {value / base:.2f}x"
            for value, base, scale in zip(row, adam, (1, 1e3, 1e3, 1e3))
        ]
        print(f"| {n} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--trees", default="resnet18,densenet121", help="comma-separated")
    args = parser.parse_args()
    for name in args.trees.split(","):
        if name not in TREES:
            parser.error(f"unknown tree {name!r}; expected some of {sorted(TREES)}")
        benchmark_tree(name, args.repeats)


if __name__ == "__main__":
    main()
