"""Trainer throughput on CPU with one step per dispatch against steps inside a lax.scan.

Run: ``python benchmarks/cpu_chunking.py`` (add ``--width 64`` for the full ResNet-18).

Why the trainer's ``chunk_steps`` defaults to 1 on CPU: XLA:CPU runs convolutions inside
``lax.scan`` loops much slower than the same step compiled on its own. For each value of
``--chunks`` this runs ``train.trainer.train_and_evaluate`` with ``chunk_steps`` set to it
(ResNet-18 at ``--width``, synthetic data, optax.adam, constant rate) and reports the
images/s of the second epoch, which excludes compilation, with the ratio to the first
value.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import jax

from train.config import Config
from train.trainer import train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 8])
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"JAX {jax.__version__}; ResNet-18 width {args.width}, batch {args.batch_size}, "
        f"{args.steps} steps per epoch"
    )
    print("| chunk_steps | images/s (epoch 2) | vs chunk_steps=1 |")
    print("|---:|---:|---:|")
    baseline = None
    for chunk in args.chunks:
        config = Config(
            opt="adam",
            recipe="none",
            epochs=2,
            batch_size=args.batch_size,
            data="synthetic",
            synthetic_size=(args.batch_size * args.steps, args.batch_size),
            width=args.width,
            chunk_steps=chunk,
            eval_batch_size=args.batch_size,
        )
        with tempfile.TemporaryDirectory() as workdir:
            rate = train_and_evaluate(config, workdir)[-1]["images_per_s"]
        if rate is None:  # only compiling steps ran: nothing timed
            print(f"| {chunk} | - | - |", flush=True)
            continue
        baseline = baseline or rate
        print(f"| {chunk} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
