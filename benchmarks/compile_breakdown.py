"""Where XLA:CPU spends compiling the update-and-apply step; what a stacked state would change.

Run: ``python benchmarks/compile_breakdown.py [--trees resnet18,densenet121] [--repeats 20]``
(CPU only; about 4 minutes on 2 cores).

Part 1, per optimizer and tree, each compiled in a fresh process with XLA's own timers on
(``TF_CPP_VMODULE=hlo_pass_pipeline=1,cpu_compiler=1,ir_compiler=1``): the compile's wall time;
the HLO passes (total and the three largest); the backend (code generation and the rest),
how many LLVM modules it compiled (one per distinct fused computation) and their summed
time (over the compile threads, so it may exceed the wall time); and the fused computations
in the optimised HLO, a proxy for the kernels a step runs.

Part 2, in one process: the non-donated update-and-apply step of the same optimizers and
of ``stacked-state probe``, a measurement probe and not an optimizer of this project: the
local SWATS update (float32, the defaults) with its per-leaf scalars (λ, the adopted rate,
the phase, the switch step and the two diagnostics) kept as one vector each, indexed in the
parameter-sized kernels by a per-leaf index held in the state. Before timing it, the script
checks that the probe's updates and λ follow ``swats_local`` on a small tree.

``optax.adam + switch sums`` is the reference row of ``benchmarks/update_speed.py``: Adam
plus the two per-leaf sums of the switch test and nothing else.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from update_speed import _apply, make_tree, with_switch_sums

import swats_jax

_XLA_LOGGING = {
    "TF_CPP_MIN_LOG_LEVEL": "0",
    "TF_CPP_VMODULE": "hlo_pass_pipeline=1,cpu_compiler=1,ir_compiler=1",
    "JAX_PLATFORMS": "cpu",
}
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


class _ProbeState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    index: optax.Updates  # per leaf, its int32 position in the vectors below
    lam: jax.Array
    sgd_lr: jax.Array
    switched: jax.Array
    switch_step: jax.Array
    estimate: jax.Array
    gamma: jax.Array


def stacked_state_probe(
    learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, switch_tol=1e-5
) -> optax.GradientTransformation:
    """Local SWATS with the per-leaf scalars stacked into vectors (float32 leaves only)."""

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        n = len(leaves)
        zeros = jnp.zeros([n], jnp.float32)
        # One buffer per leaf: the index enters each leaf's kernels as an operand, so that
        # leaves of one shape keep sharing their compiled kernels.
        index = treedef.unflatten([jnp.array(i, jnp.int32) for i in range(n)])
        return _ProbeState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            index=index,
            lam=zeros,
            sgd_lr=zeros,
            switched=jnp.zeros([n], bool),
            switch_step=jnp.full([n], -1, jnp.int32),
            estimate=zeros,
            gamma=zeros,
        )

    def update_fn(grads, state, params=None):
        del params
        treedef = jax.tree.structure(grads)
        flat = treedef.flatten_up_to
        k = (state.count + 1).astype(jnp.float32)
        bc2 = 1 - b2**k
        neg_step = -learning_rate * jnp.sqrt(bc2) / (1 - b1**k)
        first_sgd_step = state.count == state.switch_step
        updates, mu, nu, pg, pp = [], [], [], [], []
        for g, m, v, i in zip(flat(grads), flat(state.mu), flat(state.nu), flat(state.index)):

            def at(vector, i=i):
                return jax.lax.dynamic_index_in_dim(vector, i, keepdims=False)

            switched = at(state.switched)
            new_m = b1 * jnp.where(at(first_sgd_step), 0, m) + jnp.where(switched, 1, 1 - b1) * g
            new_v = jnp.where(switched, v, b2 * v + (1 - b2) * g * g)
            adam = neg_step * new_m / (jnp.sqrt(new_v) + eps)
            u = jnp.where(switched, -at(state.sgd_lr) * (1 - b1) * new_m, adam)
            updates.append(u)
            mu.append(new_m)
            nu.append(new_v)
            pg.append(jnp.sum(u * g))
            pp.append(jnp.sum(u * u))
        pg, pp = jnp.stack(pg), jnp.stack(pp)
        gamma = pp / -pg
        runs = (pg != 0) & ~state.switched & jnp.isfinite(gamma)
        lam = jnp.where(runs, b2 * state.lam + (1 - b2) * gamma, state.lam)
        estimate = lam / bc2
        passed = runs & (k > 1) & (jnp.abs(estimate - gamma) < switch_tol) & (estimate > 0)
        step = state.count + 1
        new_state = _ProbeState(
            count=step,
            mu=treedef.unflatten(mu),
            nu=treedef.unflatten(nu),
            index=state.index,
            lam=lam,
            sgd_lr=jnp.where(passed, estimate, state.sgd_lr),
            switched=state.switched | passed,
            switch_step=jnp.where(passed, step, state.switch_step),
            estimate=jnp.where(runs, estimate, state.estimate),
            gamma=jnp.where(runs, gamma, state.gamma),
        )
        return treedef.unflatten(updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adam": optax.adam(1e-3),
        "optax.adam + switch sums": with_switch_sums(optax.adam(1e-3)),
        "swats_local": swats_jax.swats_local(),
        "swats_global": swats_jax.swats_global(),
        "stacked-state probe": stacked_state_probe(),
    }


def check_probe(steps: int = 30) -> None:
    """Raises unless the probe follows ``swats_local`` on a small problem (both leaves switch
    on step 2, so both phases are compared)."""
    key_w, key_b = jax.random.split(jax.random.key(1))
    params = {"w": jax.random.normal(key_w, (16, 8)), "b": jax.random.normal(key_b, (8,))}
    ours, probe = swats_jax.swats_local(switch_tol=1e-3), stacked_state_probe(switch_tol=1e-3)
    s_ours, s_probe = ours.init(params), probe.init(params)
    for t in range(1, steps + 1):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * t) + 0.1 * p, params)
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_probe, s_probe = probe.update(grads, s_probe, params)
        for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_probe)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(jax.tree.leaves(s_ours.lam), s_probe.lam, rtol=2e-4)
        np.testing.assert_array_equal(jax.tree.leaves(s_ours.switch_step), s_probe.switch_step)
        params = optax.apply_updates(params, u_ours)


def _seconds(text: str) -> float:
    value, unit = re.match(r"([\d.]+) (\w+)", text).groups()
    return float(value) * _UNITS[unit]


def parse_xla_log(log: str) -> dict:
    """Pass, backend and LLVM-module times of the ``jit_step`` compile in an XLA:CPU log."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if "on module jit_step" in line)
    backend = next(i for i, line in enumerate(lines) if "Compiling: jit_step" in line)
    passes: collections.Counter[str] = collections.Counter()
    for line in lines[start:backend]:
        if match := re.search(r"HLO pass: (\S+) time: ([\d.]+ \w+) ", line):
            passes[match.group(1)] += _seconds(match.group(2))
    modules, module_seconds, backend_seconds = 0, 0.0, float("nan")
    for line in lines[backend:]:
        if match := re.search(r"Compiled LLVM module: \S+ time: ([\d.]+ \w+) ", line):
            modules += 1
            module_seconds += _seconds(match.group(1))
        if match := re.search(r"Compiling \[jit_step\] for CPU using JIT time: ([\d.]+ \w+)", line):
            backend_seconds = _seconds(match.group(1))
    return {
        "passes_s": sum(passes.values()),
        "largest_passes": passes.most_common(3),
        "backend_s": backend_seconds,
        "llvm_modules": modules,
        "llvm_module_s": module_seconds,
    }


def _child(optimizer: str, tree: str) -> None:
    """Compiles one optimizer's step on one tree; prints its wall time and HLO counts as JSON."""
    opt = optimizers()[optimizer]
    params, grads = make_tree(tree)
    state = jax.eval_shape(opt.init, params)
    start = time.perf_counter()
    compiled = jax.jit(_apply(opt)).lower(params, state, grads).compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    counts = {"fusions": text.count(" fusion("), "hlo_mb": len(text) / 1e6}
    print(json.dumps({"compile_s": seconds, **counts}))


def breakdown(tree: str) -> None:
    print(f"\n# {tree}: compile of the update-and-apply step, one fresh process each")
    print(
        "| optimizer | compile s | HLO passes s | largest passes | backend s "
        "| LLVM modules | their summed s | fused computations | HLO MB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name in optimizers():
        result = subprocess.run(
            [sys.executable, __file__, "--child", name, "--trees", tree],
            env={**os.environ, **_XLA_LOGGING},
            capture_output=True,
            text=True,
            check=True,
        )
        child = json.loads(result.stdout.strip().splitlines()[-1])
        xla = parse_xla_log(result.stderr)
        largest = ", ".join(f"{n} {s:.2f}" for n, s in xla["largest_passes"])
        print(
            f"| {name} | {child['compile_s']:.2f} | {xla['passes_s']:.2f} | {largest} "
            f"| {xla['backend_s']:.2f} | {xla['llvm_modules']} | {xla['llvm_module_s']:.2f} "
            f"| {child['fusions']} | {child['hlo_mb']:.1f} |"
        )


def _step_ms(opt, params, grads, repeats: int) -> float:
    step = jax.jit(_apply(opt))
    state = opt.init(params)
    for _ in range(3):
        params, state = step(params, state, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, grads))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def step_times(tree: str, repeats: int) -> None:
    params, grads = make_tree(tree)
    times = {name: _step_ms(opt, params, grads, repeats) for name, opt in optimizers().items()}
    print(f"\n# {tree}: update-and-apply step, not donated, median of {repeats}, one process")
    print("| optimizer | step ms | vs adam | vs adam + switch sums |")
    print("|---|---:|---:|---:|")
    for name, ms in times.items():
        adam, floor = times["optax.adam"], times["optax.adam + switch sums"]
        print(f"| {name} | {ms:.2f} | {ms / adam:.2f}x | {ms / floor:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="resnet18,densenet121", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.trees)
        return
    if jax.default_backend() != "cpu":
        parser.error("this breakdown reads XLA:CPU's logs; run it on a CPU machine")
    check_probe()
    print(f"jax {jax.__version__}, optax {optax.__version__}; the probe follows swats_local")
    for tree in args.trees.split(","):
        breakdown(tree)
        step_times(tree, args.repeats)


if __name__ == "__main__":
    main()
