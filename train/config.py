"""The run configuration, defined once, and the optimizer recipes of the published runs.

Every run option is one field of :class:`Config`. Its metadata holds the help text of its
``python -m train.cifar`` flag, its choices where it has some, and whether it may change
when a run resumes in the same workdir: the command line (``train.cifar``), the resume
check (``train.trainer``) and the parameters of ``colab/swats_cifar10.ipynb`` follow the
fields, so a new option is its field here (and a line in the notebook's parameters cell,
which ``tests/test_notebooks.py`` asks for).

This module does not import JAX, so that ``--help`` and flag errors answer without loading
it: :func:`make_optimizer` imports Optax and ``swats_jax`` when it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optax

OPTIMIZERS = ("swats_local", "swats_global", "adabound", "adam", "sgd")
MODELS = ("resnet18", "densenet121")
RECIPES = ("reference", "none")
DTYPES = ("float32", "bfloat16")
SWATS_MOMENTA = ("paper", "reference")


def _option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    may_change_on_resume: bool = False,
    metavar: tuple[str, ...] | None = None,
) -> Any:
    """A :class:`Config` field, with what the command line and the resume check need.

    Args:
      default: the field's default.
      help: the help text of its flag (without the default, which ``--help`` adds).
      choices: the values it may take (``None`` too where its type allows it).
      may_change_on_resume: a run resumed in the same workdir may give it another value;
        otherwise the trainer refuses to resume with a different one.
      metavar: the names of the values of a tuple field, as ``--help`` shows them.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "may_change_on_resume": may_change_on_resume,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run (``workdir`` aside). Saved as ``config.json``.

    Each field's meaning is its ``help`` metadata (``python -m train.cifar --help``).
    """

    opt: str = _option("swats_local", "optimizer", choices=OPTIMIZERS)
    model: str = _option("resnet18", "model (CIFAR variants)", choices=MODELS)
    epochs: int = _option(
        200, "number of epochs (the published runs use 200)", may_change_on_resume=True
    )
    batch_size: int = _option(128, "training batch size (128 in the published runs)")
    lr: float | None = _option(
        None, "Adam-phase (or base) learning rate; unset: the recipe's (1e-3; sgd: 0.1)"
    )
    recipe: str = _option(
        "reference",
        "'reference': the phase schedules of the published runs; 'none': constant rates",
        choices=RECIPES,
    )
    swats_momentum: str | None = _option(
        None,
        "SGD recursion of swats_global; unset: 'reference' under the reference recipe (as "
        "in the published global runs), else 'paper'",
        choices=SWATS_MOMENTA,
    )
    data: str = _option(
        "cifar10",
        "'cifar10' (downloaded and cached), 'synthetic', or a folder/archive in the "
        "cifar-10-batches-py or train/<class>/ image-folder layout",
    )
    dtype: str = _option("float32", "compute dtype (parameters stay float32)", choices=DTYPES)
    seed: int = _option(0, "seed of initialisation, shuffling and augmentation")
    max_steps: int | None = _option(
        None,
        "stop after this many optimizer steps (smoke runs); unset: no limit",
        may_change_on_resume=True,
    )
    width: int | None = _option(
        None,
        "model width override (ResNet base width / DenseNet growth rate), for tests and "
        "smoke runs; unset: the published width",
    )
    eval_batch_size: int = _option(1000, "test-set batch size")
    chunk_steps: int | None = _option(
        None,
        "training steps per compiled lax.scan chunk (one host dispatch); unset: 100 on "
        "GPU/TPU, 1 on CPU, where XLA runs convolutions inside loops many times slower "
        "(docs/benchmarks.md)",
        may_change_on_resume=True,
    )
    keep_checkpoints: int = _option(3, "number of epoch checkpoints kept")
    cache_dir: str | None = _option(
        None,
        "where downloads and decoded datasets are cached; unset: ~/.cache/swats_jax",
        may_change_on_resume=True,
    )
    synthetic_size: tuple[int, int] = _option(
        (1024, 256),
        "numbers of train and test images of the 'synthetic' data",
        metavar=("TRAIN", "TEST"),
    )
    max_train_loss: float | None = _option(
        None,
        "stop the run (exit 3, nothing saved) once the running training loss exceeds this: "
        "it diverged; unset: 1000 x ln(number of classes), 2303 on CIFAR-10; 0: never",
        may_change_on_resume=True,
    )
    num_devices: int | None = _option(
        None,
        "data parallel over the first NUM_DEVICES local devices; unset: all",
        may_change_on_resume=True,
    )

    def __post_init__(self):
        types = field_types()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # Lists from JSON, argparse (nargs) or papermill parameters become tuples.
            if typing.get_origin(types[field.name]) is tuple and isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value}")
            choices = field.metadata["choices"]
            if choices is not None:
                allowed = (None, *choices) if is_optional(types[field.name]) else choices
                if value not in allowed:
                    raise ValueError(f"{field.name} must be one of {allowed}, got {value!r}")
        for name in (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "chunk_steps",
            "keep_checkpoints",
            "num_devices",
            "width",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_train_loss is not None and not self.max_train_loss >= 0:  # NaN too
            raise ValueError(f"max_train_loss must be >= 0, got {self.max_train_loss}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **overrides: Any) -> Config:
        """The configuration of the fields named in ``values`` (other names are ignored),
        then ``overrides``; fields in neither keep their defaults.

        For a notebook whose parameters are the fields: ``Config.from_values(globals())``.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def field_types() -> dict[str, Any]:
    """The annotations of :class:`Config`'s fields, evaluated (``int | None``, ...)."""
    return typing.get_type_hints(Config)


def is_optional(annotation: Any) -> bool:
    """Whether ``annotation`` allows ``None`` (``X | None``)."""
    return type(None) in typing.get_args(annotation)


# The fields a run resumed in the same workdir may change (train.trainer checks the others).
MAY_CHANGE_ON_RESUME = frozenset(
    field.name for field in dataclasses.fields(Config) if field.metadata["may_change_on_resume"]
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The ``reference`` recipe of one optimizer (on one model).

    Attributes:
      lr: the Adam-phase (or base) learning rate, unless ``Config.lr`` sets another; also
        the constant rate of ``recipe="none"``.
      lr_changes: ``{epoch: factor}``: from the start of each ``epoch`` (1-based) on, the
        learning rate is multiplied by ``factor``.
      sgd_scale_changes: the same for the SGD-phase rate of SWATS.
      swats_momentum: the SGD recursion of ``swats_global`` (``Config.swats_momentum``
        unset).
      published: the final CIFAR-10 test accuracy (%) of the published 200-epoch run that
        the recipe reproduces; ``None`` for the baselines.
    """

    lr: float
    lr_changes: Mapping[int, float] = dataclasses.field(default_factory=dict)
    sgd_scale_changes: Mapping[int, float] = dataclasses.field(default_factory=dict)
    swats_momentum: str | None = None
    published: float | None = None


# The reference recipes by (opt, model); model None: the same on every model. CIFAR-10,
# batch 128, 391 steps per epoch, 200 epochs in the published runs. SWATS: the local-switch
# study's reference code (AnirudhMaiya/Rethinking-SWATS-Optimizer), after Keskar & Socher
# 2017 (arXiv:1712.07628); AdaBound: Luo et al., ICLR 2019 (final_lr 0.1, bounds scaled with
# the rate); adam and sgd: common baselines outside the published comparison. See
# docs/algorithm.md, section 6.
REFERENCE_RECIPES: dict[tuple[str, str | None], Recipe] = {
    ("swats_local", "resnet18"): Recipe(
        1e-3, lr_changes={100: 0.1}, sgd_scale_changes={75: 0.1, 150: 0.1}, published=94.13
    ),
    ("swats_local", "densenet121"): Recipe(
        1e-3, lr_changes={100: 0.1}, sgd_scale_changes={75: 0.1, 150: 0.1}, published=94.62
    ),
    ("swats_global", "resnet18"): Recipe(
        1e-3, sgd_scale_changes={100: 0.1}, swats_momentum="reference", published=92.89
    ),
    ("swats_global", "densenet121"): Recipe(
        1e-3, sgd_scale_changes={150: 0.1}, swats_momentum="reference", published=93.30
    ),
    ("adabound", "resnet18"): Recipe(1e-3, lr_changes={101: 0.1}, published=93.0),
    ("adabound", "densenet121"): Recipe(1e-3, lr_changes={151: 0.1}, published=93.36),
    ("adam", None): Recipe(1e-3),
    ("sgd", None): Recipe(0.1, lr_changes={100: 0.1, 150: 0.1}),
}

# Final CIFAR-10 test accuracy (%) of the published runs, by (model, opt).
PUBLISHED_TEST_ACCURACY: dict[tuple[str, str], float] = {
    (model, opt): recipe.published
    for (opt, model), recipe in REFERENCE_RECIPES.items()
    if recipe.published is not None
}


def reference_recipe(opt: str, model: str) -> Recipe:
    """The reference recipe of ``opt`` on ``model``.

    Raises:
      ValueError: ``opt`` is not one of ``OPTIMIZERS``, or has no recipe for ``model``.
    """
    if opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
    recipe = REFERENCE_RECIPES.get((opt, model), REFERENCE_RECIPES.get((opt, None)))
    if recipe is None:
        raise ValueError(f"no reference recipe of {opt!r} for model {model!r}")
    return recipe


@dataclasses.dataclass(frozen=True)
class OptimizerSetup:
    """The optimizer of a run and the schedules it follows, for logging.

    Attributes:
      optimizer: the transformation.
      learning_rate: the Adam-phase (or base) rate per optimizer count.
      sgd_scale: the SGD-phase rate scale per optimizer count (1 outside SWATS).
      switches: it switches from Adam to SGD (SWATS): the run has switch tables and tests.
    """

    optimizer: optax.GradientTransformation
    learning_rate: Callable[[int], Any]
    sgd_scale: Callable[[int], Any]
    switches: bool = False


def _from_epochs(steps_per_epoch: int, value: float, changes: Mapping[int, float]):
    """A piecewise-constant schedule: ``value`` times ``factor`` from the start of each epoch.

    Epoch ``e`` (1-based) covers optimizer counts ``(e - 1) * steps_per_epoch`` to
    ``e * steps_per_epoch - 1``, so a change "from epoch e" happens at count
    ``(e - 1) * steps_per_epoch``. Without changes, a constant schedule.
    """
    import optax

    if not changes:
        return optax.constant_schedule(value)
    boundaries = {(epoch - 1) * steps_per_epoch: factor for epoch, factor in changes.items()}
    return optax.piecewise_constant_schedule(value, boundaries)


def make_optimizer(config: Config, steps_per_epoch: int) -> OptimizerSetup:
    """Builds the optimizer of ``config``, with the recipe's schedules.

    The ``reference`` recipes (:data:`REFERENCE_RECIPES`; CIFAR-10, batch 128, 391 steps
    per epoch in the published runs), targeting these final test accuracies
    (ResNet-18 / DenseNet-121):

    - ``swats_local``: SGD-phase rates /10 from epoch 75 and /100 from epoch 150;
      Adam-phase lr 1e-3, 1e-4 from epoch 100. Published: 94.13 / 94.62.
    - ``swats_global``: SGD-phase rate /10 from epoch 100 (ResNet-18) or 150
      (DenseNet-121); Adam lr 1e-3; the reference SGD recursion. Published: 92.89 / 93.30.
    - ``adabound``: lr 1e-3, final_lr 0.1; lr and bounds x0.1 from epoch 101 (ResNet-18)
      or 151 (DenseNet-121). Published: 93.0 / 93.36.
    - ``adam``: lr 1e-3, constant (a baseline; not part of the published table).
    - ``sgd``: lr 0.1, momentum 0.9, x0.1 from epochs 100 and 150 (a common CIFAR
      baseline; not part of the published table).

    ``config.lr`` replaces the initial rate (the changes apply to it). With
    ``recipe="none"`` every rate is constant and ``swats_global`` uses the paper's SGD
    recursion (unless ``config.swats_momentum`` says otherwise).

    Raises:
      ValueError: ``config.opt`` is not a known optimizer.
    """
    import optax  # here rather than at the top: see the module docstring

    import swats_jax

    recipe = reference_recipe(config.opt, config.model)
    lr_value = config.lr if config.lr is not None else recipe.lr
    if config.recipe == "reference":
        lr = _from_epochs(steps_per_epoch, lr_value, recipe.lr_changes)
        scale = _from_epochs(steps_per_epoch, 1.0, recipe.sgd_scale_changes)
        momentum = config.swats_momentum or recipe.swats_momentum
    else:
        lr = optax.constant_schedule(lr_value)
        scale = optax.constant_schedule(1.0)
        momentum = config.swats_momentum or "paper"

    match config.opt:
        case "swats_local":
            optimizer = swats_jax.swats_local(learning_rate=lr, sgd_scale=scale)
            return OptimizerSetup(optimizer, lr, scale, switches=True)
        case "swats_global":
            optimizer = swats_jax.swats_global(learning_rate=lr, sgd_scale=scale, momentum=momentum)
            return OptimizerSetup(optimizer, lr, scale, switches=True)
        case "adabound":
            optimizer = swats_jax.adabound(learning_rate=lr, final_lr=0.1, base_lr=lr_value)
        case "adam":
            optimizer = optax.adam(lr)
        case "sgd":
            optimizer = optax.sgd(lr, momentum=0.9)
        case _:  # a recipe without a constructor
            raise ValueError(f"unknown optimizer {config.opt!r}; known: {', '.join(OPTIMIZERS)}")
    return OptimizerSetup(optimizer, lr, scale)
