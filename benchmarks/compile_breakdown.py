"""Where XLA:CPU spends compiling the update-and-apply step, and what the step costs.

Run: ``python benchmarks/compile_breakdown.py [--trees resnet18,densenet121] [--repeats 20]``
(CPU only; about 4 minutes on 2 cores).

Part 1, per optimizer and tree, each compiled in a fresh process with XLA's own timers on
(``TF_CPP_VMODULE=hlo_pass_pipeline=1,cpu_compiler=1,ir_compiler=1``): the compile's wall time;
the HLO passes (total and the three largest); the backend (code generation and the rest),
how many LLVM modules it compiled (one per distinct fused computation) and their summed
time (over the compile threads, so it may exceed the wall time); and the fused computations
in the optimised HLO, a proxy for the kernels a step runs.

Part 2, in one process: the non-donated update-and-apply step of the same optimizers.

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

import jax
import optax
from update_speed import _apply, make_tree, time_step, with_switch_sums

import swats_jax

_XLA_LOGGING = {
    "TF_CPP_MIN_LOG_LEVEL": "0",
    "TF_CPP_VMODULE": "hlo_pass_pipeline=1,cpu_compiler=1,ir_compiler=1",
    "JAX_PLATFORMS": "cpu",
}
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adam": optax.adam(1e-3),
        "optax.adam + switch sums": with_switch_sums(optax.adam(1e-3)),
        "swats_local": swats_jax.swats_local(),
        "swats_global": swats_jax.swats_global(),
    }


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


def step_times(tree: str, repeats: int) -> None:
    params, grads = make_tree(tree)
    times = {
        name: 1e3 * time_step(opt, params, grads, repeats, donate=False)
        for name, opt in optimizers().items()
    }
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
    print(f"jax {jax.__version__}, optax {optax.__version__}")
    for tree in args.trees.split(","):
        breakdown(tree)
        step_times(tree, args.repeats)


if __name__ == "__main__":
    main()
