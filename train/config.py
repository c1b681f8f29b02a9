"""Training configuration and the optimizer recipes of the published SWATS runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import swats_jax

OPTIMIZERS = ("swats_local", "swats_global", "adabound", "adam", "sgd")
MODELS = ("resnet18", "densenet121")
RECIPES = ("reference", "none")
DTYPES = ("float32", "bfloat16")

# Final CIFAR-10 test accuracy (%) of the published 200-epoch runs that the reference
# recipes target, by (model, opt): SWATS from the local-switch study's reference code
# (AnirudhMaiya/Rethinking-SWATS-Optimizer), AdaBound from Luo et al., ICLR 2019.
PUBLISHED_TEST_ACCURACY = {
    ("resnet18", "swats_global"): 92.89,
    ("resnet18", "swats_local"): 94.13,
    ("resnet18", "adabound"): 93.0,
    ("densenet121", "swats_global"): 93.30,
    ("densenet121", "swats_local"): 94.62,
    ("densenet121", "adabound"): 93.36,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run (``workdir`` aside). Saved as ``config.json``.

    Attributes:
      opt: one of ``OPTIMIZERS``.
      model: ``"resnet18"`` or ``"densenet121"``.
      epochs: number of epochs (the published runs use 200).
      batch_size: training batch size (128 in the published runs).
      lr: Adam-phase (or base) learning rate; ``None`` takes the recipe's.
      recipe: ``"reference"`` (the published phase schedules, see :func:`make_optimizer`)
        or ``"none"`` (constant rates).
      swats_momentum: SGD recursion of ``swats_global``; ``None`` lets the recipe choose
        (``"reference"`` under the reference recipe, as the published global runs
        were made with it, else ``"paper"``).
      data: ``"cifar10"``, ``"synthetic"`` or a folder/archive path (see ``train.data``).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
      seed: seed of initialisation, shuffling and augmentation.
      max_steps: stop after this many optimizer steps (smoke runs); ``None`` for no limit.
      width: model width override (ResNet base width / DenseNet growth rate), for tests.
      eval_batch_size: test-set batch size.
      chunk_steps: training steps per compiled ``lax.scan`` chunk (one host dispatch);
        ``None`` for 100 on accelerators and 1 on CPU, where XLA runs convolutions inside
        loops many times slower (``benchmarks/cpu_chunking.py``: 16x, docs/benchmarks.md).
      keep_checkpoints: number of epoch checkpoints kept.
      cache_dir: where downloads and decoded datasets are cached.
      synthetic_size: numbers of train and test images of ``data="synthetic"``.
      num_devices: data-parallel over the first N local devices; ``None`` for all.
    """

    opt: str = "swats_local"
    model: str = "resnet18"
    epochs: int = 200
    batch_size: int = 128
    lr: float | None = None
    recipe: str = "reference"
    swats_momentum: str | None = None
    data: str = "cifar10"
    dtype: str = "float32"
    seed: int = 0
    max_steps: int | None = None
    width: int | None = None
    eval_batch_size: int = 1000
    chunk_steps: int | None = None
    keep_checkpoints: int = 3
    cache_dir: str | None = None
    synthetic_size: tuple[int, int] = (1024, 256)
    num_devices: int | None = None

    def __post_init__(self):
        choices = {
            "opt": OPTIMIZERS,
            "model": MODELS,
            "recipe": RECIPES,
            "dtype": DTYPES,
            "swats_momentum": (None, "paper", "reference"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "chunk_steps", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OptimizerSetup:
    """The optimizer of a run and the schedules it follows, for logging."""

    optimizer: optax.GradientTransformation
    learning_rate: Callable[[int], Any]
    sgd_scale: Callable[[int], Any]


def _from_epochs(steps_per_epoch: int, value: float, changes: dict[int, float]) -> optax.Schedule:
    """A piecewise-constant schedule: ``value`` times ``factor`` from the start of each epoch.

    Epoch ``e`` (1-based) covers optimizer counts ``(e - 1) * steps_per_epoch`` to
    ``e * steps_per_epoch - 1``, so a change "from epoch e" happens at count
    ``(e - 1) * steps_per_epoch``.
    """
    boundaries = {(epoch - 1) * steps_per_epoch: factor for epoch, factor in changes.items()}
    return optax.piecewise_constant_schedule(value, boundaries)


def make_optimizer(config: Config, steps_per_epoch: int) -> OptimizerSetup:
    """Builds the optimizer of ``config``, with the recipe's schedules.

    The ``reference`` recipes (CIFAR-10, batch 128, 391 steps per epoch in the published
    runs; ``../shared/docs/SWATS_SPEC.md`` section 6), targeting these final test
    accuracies (ResNet-18 / DenseNet-121):

    - ``swats_local``: SGD-phase rates /10 from epoch 75 and /100 from epoch 150;
      Adam-phase lr 1e-3, 1e-4 from epoch 100. Published: 94.13 / 94.62.
    - ``swats_global``: SGD-phase rate /10 from epoch 100 (ResNet-18) or 150
      (DenseNet-121); Adam lr 1e-3; the reference SGD recursion. Published: 92.89 / 93.30.
    - ``adabound``: lr 1e-3, final_lr 0.1; lr and bounds x0.1 from epoch 101 (ResNet-18)
      or 151 (DenseNet-121). Published: 93.0 / 93.36.
    - ``adam``: lr 1e-3, constant (a baseline; not part of the published table).
    - ``sgd``: lr 0.1, momentum 0.9, x0.1 from epochs 100 and 150 (a common CIFAR
      baseline; not part of the published table).

    With ``recipe="none"`` every rate is constant.
    """
    reference = config.recipe == "reference"
    default_lr = 0.1 if config.opt == "sgd" else 1e-3
    lr_value = config.lr if config.lr is not None else default_lr
    constant = optax.constant_schedule
    lr = constant(lr_value)
    scale = constant(1.0)
    densenet = config.model == "densenet121"
    at = steps_per_epoch

    if config.opt == "swats_local":
        if reference:
            lr = _from_epochs(at, lr_value, {100: 0.1})
            scale = _from_epochs(at, 1.0, {75: 0.1, 150: 0.1})
        optimizer = swats_jax.swats_local(learning_rate=lr, sgd_scale=scale)
    elif config.opt == "swats_global":
        if reference:
            scale = _from_epochs(at, 1.0, {150 if densenet else 100: 0.1})
        momentum = config.swats_momentum or ("reference" if reference else "paper")
        optimizer = swats_jax.swats_global(learning_rate=lr, sgd_scale=scale, momentum=momentum)
    elif config.opt == "adabound":
        if reference:
            lr = _from_epochs(at, lr_value, {151 if densenet else 101: 0.1})
        optimizer = swats_jax.adabound(learning_rate=lr, final_lr=0.1, base_lr=lr_value)
    elif config.opt == "adam":
        optimizer = optax.adam(lr)
    else:
        if reference:
            lr = _from_epochs(at, lr_value, {100: 0.1, 150: 0.1})
        optimizer = optax.sgd(lr, momentum=0.9)
    return OptimizerSetup(optimizer, lr, scale)
