"""Command line: ``python -m train.cifar --opt=swats_local [--model=resnet18] ...``.

Parses flags into a :class:`train.config.Config` and calls
:func:`train.trainer.train_and_evaluate`. See ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from train import config as config_lib


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    defaults = config_lib.Config()
    parser = _Parser(
        prog="python -m train.cifar",
        description="Train a CIFAR-10 model with SWATS, AdaBound, Adam or SGD.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--opt", choices=config_lib.OPTIMIZERS, default=defaults.opt)
    parser.add_argument("--model", choices=config_lib.MODELS, default=defaults.model)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--lr", type=float, default=None, help="Adam-phase / base learning rate (recipe's if unset)"
    )
    parser.add_argument(
        "--recipe",
        choices=config_lib.RECIPES,
        default=defaults.recipe,
        help="'reference': the phase schedules of the published runs; 'none': constant rates",
    )
    parser.add_argument(
        "--swats-momentum",
        choices=("paper", "reference"),
        default=None,
        help="SGD recursion of swats_global (default: 'reference' under --recipe=reference)",
    )
    parser.add_argument(
        "--data",
        default=defaults.data,
        help="'cifar10' (downloaded and cached), 'synthetic', or a folder/archive in the "
        "cifar-10-batches-py or train/<class>/ image-folder layout",
    )
    parser.add_argument("--workdir", default="runs/cifar10", help="outputs and checkpoints")
    parser.add_argument("--dtype", choices=config_lib.DTYPES, default=defaults.dtype)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument(
        "--width", type=int, default=None, help="model width override (tests and smoke runs)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    parser.add_argument(
        "--chunk-steps",
        type=int,
        default=defaults.chunk_steps,
        help="training steps per compiled lax.scan chunk (default: 100 on GPU/TPU, 1 on CPU)",
    )
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    parser.add_argument("--cache-dir", default=None, help="download/decode cache")
    parser.add_argument(
        "--synthetic-size",
        type=int,
        nargs=2,
        default=defaults.synthetic_size,
        metavar=("TRAIN", "TEST"),
    )
    parser.add_argument(
        "--num-devices", type=int, default=None, help="use the first N local devices"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_lib.Config(
            opt=args.opt,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            recipe=args.recipe,
            swats_momentum=args.swats_momentum,
            data=args.data,
            dtype=args.dtype,
            seed=args.seed,
            max_steps=args.max_steps,
            width=args.width,
            eval_batch_size=args.eval_batch_size,
            chunk_steps=args.chunk_steps,
            keep_checkpoints=args.keep_checkpoints,
            cache_dir=args.cache_dir,
            synthetic_size=tuple(args.synthetic_size),
            num_devices=args.num_devices,
        )
    except ValueError as err:
        parser.error(str(err))

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("train").setLevel(logging.INFO)
    # Imported here so that --help and flag errors answer without loading JAX.
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.trainer import ConfigMismatchError, MetricsError, train_and_evaluate

    try:
        train_and_evaluate(config, args.workdir)
    except (DatasetError, ConfigMismatchError, CheckpointError, MetricsError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
