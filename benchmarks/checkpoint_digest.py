"""The cost of the checkpoints' per-array digests, on the trainer's ResNet-18 state.

Run: ``python benchmarks/checkpoint_digest.py`` (``--width 64``, the published ResNet-18,
by default).

Builds the state a run saves every epoch (parameters, batch statistics and the
``swats_local`` optimizer state, on the default device), then times, each ``--repeats``
times (median): :func:`train.checkpoint.array_digests` alone, a whole
:meth:`Checkpointer.save` (which computes them) and a whole ``restore_latest`` (which
checks them).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax

from train.checkpoint import Checkpointer, array_digests
from train.config import Config, make_optimizer
from train.trainer import init_model


def _median_s(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = Config(opt="swats_local", width=args.width)
    _, params, stats = init_model(config, 10)
    state = {"params": params, "batch_stats": stats}
    state["opt_state"] = make_optimizer(config, 391).optimizer.init(params)
    state = jax.device_put(state)
    leaves = jax.tree.leaves(state)
    megabytes = sum(leaf.nbytes for leaf in leaves) / 1e6
    print(
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"JAX {jax.__version__}; ResNet-18 width {args.width}, swats_local: {len(leaves)} "
        f"arrays, {megabytes:.0f} MB; median of {args.repeats}"
    )
    digest_s = _median_s(lambda: array_digests(state), args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        with Checkpointer(Path(folder), keep=1) as checkpointer:
            epochs = iter(range(1, args.repeats + 1))
            save_s = _median_s(lambda: checkpointer.save(next(epochs), state), args.repeats)
            restore_s = _median_s(lambda: checkpointer.restore_latest(state), args.repeats)
    print("| | seconds | digest share |")
    print("|---|---:|---:|")
    print(f"| digests of the state | {digest_s:.3f} | |")
    print(f"| save (with the digests) | {save_s:.3f} | {digest_s / save_s:.0%} |")
    print(f"| restore (with the check) | {restore_s:.3f} | {digest_s / restore_s:.0%} |")


if __name__ == "__main__":
    main()
