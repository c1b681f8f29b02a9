"""The CIFAR-10 training loop: ``train_and_evaluate(config, workdir)``.

The whole dataset lives on the device(s). Each epoch is a shuffled permutation of it;
on accelerators the training steps of a chunk run inside one jitted ``lax.scan``
(augmentation included), on CPU one jitted step per dispatch (XLA:CPU runs convolutions
inside loops far slower); either way the metrics are fetched once per epoch.
With several devices the batch is sharded over them (data parallel) and parameters and
optimizer state are replicated. With several processes (``jax.distributed.initialize()``
called first, as ``python -m train.cifar --coordinator ...`` does), the devices of every
process form one mesh: each process holds the whole dataset, all take the same global
batches, and each step's gradient is reduced across processes. Process 0 writes the run's
files; all processes save and restore the checkpoints together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import swats_jax
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import models, xla_cpu
from train.checkpoint import Checkpointer
from train.config import MAY_CHANGE_ON_RESUME, Config, OptimizerSetup, make_optimizer
from train.messages import describe_error as describe_error  # re-exported for train.cifar
from train.metrics import MetricsError as MetricsError  # re-exported: train.cifar catches it

log = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    """The workdir holds a run made with a different configuration."""


class WorkdirError(ValueError):
    """The workdir cannot be created or written to."""


class SetupError(ValueError):
    """The configuration cannot run on these devices or this data (e.g. a batch size that
    the device count does not divide)."""


class ReplicaMismatchError(RuntimeError):
    """The processes of a multi-process run no longer hold the same parameters."""


class ProcessFailedError(RuntimeError):
    """One process of a multi-process run failed writing the run's files; every process
    raises this, with the same message, and stops."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that state."""


class DivergedError(NonFiniteLossError):
    """The training loss rose above ``Config.max_train_loss``: the run diverged, and stopped
    as on a non-finite loss, without saving that state."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run at a step boundary; the message says how to resume."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax NNX model split into its static graph and its state templates.

    The training loop carries parameters and batch statistics as plain nested dicts
    (``nnx.to_pure_dict``); :meth:`merge` turns them back into a callable module.

    Attributes:
      graphdef: the static graph of ``nnx.split``.
      param_template: the ``nnx.Param`` state the parameters are poured into.
      stats_template: the ``nnx.BatchStat`` state the batch statistics are poured into.
    """

    graphdef: Any
    param_template: Any
    stats_template: Any

    def merge(self, params: dict, stats: dict) -> nnx.Module:
        """The module with ``params`` and ``stats``; the templates are left unchanged."""
        param_state = jax.tree.map(lambda x: x, self.param_template)
        stats_state = jax.tree.map(lambda x: x, self.stats_template)
        nnx.replace_by_pure_dict(param_state, params)
        nnx.replace_by_pure_dict(stats_state, stats)
        return nnx.merge(self.graphdef, param_state, stats_state)


def init_model(config: Config, num_classes: int) -> tuple[Model, dict, dict]:
    """Creates and initialises ``config.model`` as the trainer does.

    Deterministic given ``config`` (its ``model``, ``width``, ``dtype`` and ``seed``) and
    ``num_classes``: this rebuilds a run's starting point, or a target to restore its
    checkpoints into.

    Args:
      config: the run's configuration.
      num_classes: size of the output layer.

    Returns:
      The ``Model``, and its initial parameters and batch statistics as nested dicts.
    """
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    # The rbg PRNG compiles one initialiser per shape much faster than threefry on CPU.
    rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
    model = models.create_model(
        config.model, num_classes=num_classes, width=config.width, dtype=dtype, rngs=rngs
    )
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    template = Model(graphdef, params, stats)
    return template, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def _make_steps(
    model: Model, optimizer: optax.GradientTransformation, batch_sharding, *, augment: bool = True
):
    """The jitted functions of the loop: a chunk of training steps and the evaluation.

    ``augment=False`` trains on the images as they are, only normalised (the whole-step
    tests compare the step with an independent implementation on fixed batches).
    """

    def loss_fn(params, stats, images, labels):
        net = model.merge(params, stats)
        net.train()
        logits = net(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        new_stats = nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))
        return loss, (logits, new_stats)

    def train_step(carry, step_input, dataset, aug_key):
        params, stats, opt_state, totals = carry
        indices, step = step_input
        images = jax.lax.with_sharding_constraint(dataset["images"][indices], batch_sharding)
        labels = jax.lax.with_sharding_constraint(dataset["labels"][indices], batch_sharding)
        if augment:
            images = data_lib.augment(jax.random.fold_in(aug_key, step), images)
        else:
            images = data_lib.preprocess_eval(images)
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, images, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        count = labels.shape[0]
        totals = totals + jnp.stack([loss * count, correct, count]).astype(jnp.float32)
        return (params, stats, opt_state, totals), None

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry, indices, steps, dataset, aug_key):
        """Runs ``len(steps)`` training steps; ``indices`` is [steps, batch]."""
        step = functools.partial(train_step, dataset=dataset, aug_key=aug_key)
        if len(steps) == 1:  # no loop: XLA:CPU runs convolutions in loops far slower
            carry, _ = step(carry, (indices[0], steps[0]))
            return carry
        carry, _ = jax.lax.scan(step, carry, (indices, steps))
        return carry

    @jax.jit
    def evaluate_batch(params, stats, images, labels, mask):
        """Sums of loss and correct predictions over one (masked) test batch."""
        net = model.merge(params, stats)
        net.eval()
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        logits = net(data_lib.preprocess_eval(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        return jnp.stack([jnp.sum(loss * mask), jnp.sum(correct * mask)])

    def evaluate(params, stats, images, labels, mask):
        """Sums over [batches, batch] arrays: one dispatch per batch, one fetch at the end
        (a ``lax.scan`` here would hit XLA:CPU's slow convolutions inside loops)."""
        totals = [evaluate_batch(params, stats, *batch) for batch in zip(images, labels, mask)]
        return jnp.sum(jnp.stack(totals), axis=0)

    return train_chunk, evaluate


def _eval_batches(images: np.ndarray, labels: np.ndarray, batch: int, multiple: int):
    """Pads the test set to whole batches (a multiple of the device count) with a mask."""
    batch = max(multiple, batch - batch % multiple)
    num = len(labels)
    batches = math.ceil(num / batch)
    pad = batches * batch - num
    mask = np.concatenate([np.ones(num, np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    shape = (batches, batch)
    return images.reshape(*shape, *images.shape[1:]), labels.reshape(shape), mask.reshape(shape)


def _check_config(workdir: Path, config: Config) -> None:
    """Refuses to resume a run made with a different configuration."""
    path = workdir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        ignored = MAY_CHANGE_ON_RESUME
        current = config.to_json()
        saved.pop("workdir", None)
        diff = {
            k: (saved.get(k), current[k])
            for k in current
            if k not in ignored and json.loads(json.dumps(current[k])) != saved.get(k)
        }
        if diff:
            changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different configuration ({changes}); "
                "use another --workdir"
            )


def _write_config(workdir: Path, config: Config) -> None:
    path = workdir / "config.json"
    path.write_text(json.dumps({**config.to_json(), "workdir": str(workdir)}, indent=2) + "\n")


@dataclasses.dataclass
class _EpochTime:
    """Where an epoch's time went: the chunks that compiled a program (their time and
    images) apart, so that images/s counts the steps alone."""

    start: float = dataclasses.field(default_factory=lambda: time.perf_counter())
    compile_s: float = 0.0
    compile_images: int = 0

    def images_per_s(self, images: float, now: float | None = None) -> float | None:
        """The rate of the ``images`` trained by ``now`` (default: now), the compiling
        chunks excluded; call it once they are done. None when only compiling chunks ran."""
        timed = images - self.compile_images
        elapsed = (time.perf_counter() if now is None else now) - self.start - self.compile_s
        return timed / elapsed if timed > 0 and elapsed > 0 else None


def _rate(images_per_s: float | None) -> str:
    return "?" if images_per_s is None else f"{images_per_s:.0f}"


class _EpochProgress:
    """An epoch's progress: a bar in a terminal that can show one, log lines otherwise.

    About every 10% of the epoch, and at least every ``interval_s`` seconds, it reads the
    running loss (a host transfer, which waits for the steps so far) and stops the run if
    it is not finite or above ``max_loss``. Without a bar it then logs the step, the loss,
    images/s and the number of switched arrays. With several processes, pass
    ``interval_s=math.inf``: every process then checks on the same steps, so that all stop
    together. While the bar shows, log lines are written above it, never onto its line.
    """

    def __init__(
        self,
        epoch: int,
        total: int,
        first_step: int,
        timing: _EpochTime,
        *,
        max_loss: float = math.inf,
        interval_s: float = 60.0,
    ):
        self.epoch, self.total, self.first_step = epoch, total, first_step
        self.timing, self.max_loss = timing, max_loss
        self.every = max(1, math.ceil(total / 10))
        self.next_report = self.every
        self.interval_s = interval_s
        self.last_report = time.perf_counter()
        self.bar = None
        self._stack = contextlib.ExitStack()

    def update(self, size: int, done: int, totals: jax.Array, opt_state: Any) -> bool:
        """Counts ``size`` more steps (``done`` in all); whether this was a check point."""
        if self.bar is not None:
            self.bar.update(size)
        now = time.perf_counter()
        if done < self.next_report and now - self.last_report < self.interval_s:
            return False
        self.next_report = done + self.every
        self.last_report = now
        loss_sum, _, count = np.asarray(totals)
        loss = float(loss_sum / count)
        _check_loss(loss, self.max_loss, self.epoch, self.first_step + done)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif done < self.total:  # the epoch's own line reports its end
            log.info(
                "epoch %d: step %d/%d, train loss %.4f, %s images/s, %d arrays switched",
                self.epoch,
                done,
                self.total,
                loss,
                _rate(self.timing.images_per_s(count)),
                swats_jax.num_switched(opt_state),
            )
        return True

    def __enter__(self) -> _EpochProgress:
        """Shows the bar, if the terminal can, and sends log lines above it until exit."""
        if _terminal_shows_a_bar():
            with contextlib.ExitStack() as stack:
                stack.enter_context(logging_redirect_tqdm())
                bar = tqdm(total=self.total, desc=f"epoch {self.epoch}", unit="step", leave=True)
                stack.callback(bar.close)
                self._stack = stack.pop_all()
            self.bar = bar
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()  # the bar closed, then the log lines back to their handlers


def _terminal_shows_a_bar() -> bool:
    """Whether stderr is a terminal wide enough for a progress bar. Some report no size
    (0 columns under ``script``, on some CI runners): a bar would print nothing there."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns >= 40
    except (OSError, ValueError):  # no file descriptor, or not a terminal after all
        return False


def _check_loss(loss: float, max_loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss became {loss} by step {step} (epoch {epoch}); stopped without "
            "saving this state: lower --lr, or check the data"
        )
    if loss > max_loss:
        raise DivergedError(
            f"the training loss reached {loss:.4g} by step {step} (epoch {epoch}), above "
            f"--max-train-loss {max_loss:.4g}: the run diverged; stopped without saving this "
            "state: lower --lr, or check the data"
        )


class _InterruptFlag:
    """Ctrl-C (SIGINT) asks the loop to stop at the next step boundary; a second one
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("interrupting at the next step boundary (Ctrl-C again to stop at once)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _devices(config: Config) -> list[jax.Device]:
    """The devices the batch is sharded over: every device of every process (with
    ``jax.distributed``), or the first ``num_devices`` local ones of a single process."""
    if jax.process_count() == 1:
        return jax.local_devices()[: config.num_devices]
    if config.num_devices is not None:
        raise SetupError(
            "num_devices applies to single-process runs; with several processes the batch "
            "is sharded over every device of every process"
        )
    return jax.devices()


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int8(flag))))


def _check_replicas_agree(params: Any, epoch: int) -> None:
    """Stops a multi-process run whose processes no longer hold the same parameters."""
    from jax.experimental import multihost_utils

    # One digest of the digests of every array (by path, in order), the same in every process.
    digests = json.dumps(checkpoint_lib.array_digests(params), sort_keys=True).encode()
    try:
        multihost_utils.assert_equal(np.frombuffer(hashlib.sha256(digests).digest(), np.uint8))
    except AssertionError as err:
        raise ReplicaMismatchError(
            f"the processes hold different parameters after epoch {epoch}; check that every "
            "process runs the same command on the same data and software"
        ) from err


class _NoMetrics:
    """The metrics log of a process other than process 0, which writes nothing."""

    def records(self) -> list[dict[str, Any]]:
        return []


def _prepare_workdir(workdir: Path) -> Path | None:
    """Creates ``workdir`` if needed and checks that it is writable.

    Returns:
      The highest folder this call created (``workdir`` or one of its parents), or ``None``.

    Raises:
      WorkdirError: it is a file, or cannot be created or written to.
    """
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"the workdir {workdir} is a file, not a folder; use another --workdir")
    created = None
    for folder in (workdir, *workdir.absolute().parents):
        if folder.exists():
            break
        created = folder
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(
            f"cannot write to the workdir {workdir}: {describe_error(err, with_file=False)}; "
            "use another --workdir"
        ) from err
    return created


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str], dataset: data_lib.Dataset | None = None
) -> list[dict[str, Any]]:
    """Trains and evaluates ``config`` in ``workdir``, resuming from its last checkpoint.

    Writes ``config.json``, ``metrics.jsonl`` / ``metrics.csv`` (one record per epoch),
    ``switches.md`` / ``switches.csv`` and ``rates.csv`` (SWATS runs), ``test_accuracy.png`` and
    ``checkpoints/`` (one per epoch, the last ``keep_checkpoints`` kept).

    Args:
      config: the run's configuration.
      workdir: output folder; created if needed.
      dataset: already loaded data (otherwise ``config.data`` is loaded).

    Returns:
      The metrics records of all epochs so far (in process 0; other processes of a
      multi-process run write no metrics and return an empty list).

    Raises:
      train.data.DatasetError: the dataset cannot be loaded.
      WorkdirError: ``workdir`` is a file, or cannot be created or written to.
      ConfigMismatchError: ``workdir`` holds a run with another configuration.
      train.metrics.MetricsError: ``workdir`` holds a ``metrics.jsonl`` that cannot be read.
      train.checkpoint.CheckpointError: checkpoints exist but none can be restored, or a
        checkpoint cannot be saved (a full disk, say).
      SetupError: the configuration cannot run on these devices or this data.
      NonFiniteLossError: the training loss became NaN or infinite (nothing of it is saved).
      DivergedError: a NonFiniteLossError: the training loss rose above
        ``config.max_train_loss`` (nothing of it is saved).
      ReplicaMismatchError: the processes of a multi-process run hold different parameters.
      ProcessFailedError: with several processes, process 0 failed writing the run's files
        (every process raises it, with the same message).
      OSError: a file of the run cannot be written (a full disk, say).
      TrainingInterrupted: Ctrl-C; the run stopped at a step boundary.
    """
    xla_cpu.tune()  # a no-op once JAX has computed something in this process
    workdir = Path(workdir)
    created = _prepare_workdir(workdir)
    try:
        return _train_and_evaluate(config, workdir, dataset)
    except BaseException:
        # A workdir this call created and that holds no finished epoch is not left behind.
        primary = jax.process_index() == 0
        metrics_file = workdir / "metrics.jsonl"
        finished = metrics_file.exists() and metrics_file.read_text().strip()
        if primary and created is not None and not finished:
            shutil.rmtree(created, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop of a run needs, set up once by :func:`_set_up`."""

    config: Config
    workdir: Path
    setup: OptimizerSetup
    train_chunk: Callable[..., Any]
    evaluate: Callable[..., jax.Array]
    put: Callable[[Any], Any]  # places host arrays, replicated over every device
    train_data: dict[str, jax.Array]
    eval_data: tuple[jax.Array, ...]
    shuffle_key: jax.Array
    aug_key: jax.Array
    num_train: int
    num_test: int
    full_batches: int
    remainder: int  # the images of the partial last batch of an epoch; 0: none
    chunk_steps: int
    max_loss: float  # a training loss above it stops the run (math.inf: never)

    @property
    def primary(self) -> bool:
        """Whether this is process 0, which writes the run's files (all processes save and
        restore the checkpoints together, as Orbax expects)."""
        return jax.process_index() == 0

    @property
    def multiprocess(self) -> bool:
        return jax.process_count() > 1

    @property
    def inputs(self) -> tuple[dict[str, jax.Array], jax.Array]:
        """The training step's arguments after the chunk's indices and steps."""
        return self.train_data, self.aug_key

    @property
    def steps_per_epoch(self) -> int:
        return self.full_batches + (1 if self.remainder else 0)

    def epoch_steps(self, step: int) -> int:
        """The steps of the epoch that starts after ``step`` steps: fewer under
        ``max_steps``, 0 once it is reached."""
        if self.config.max_steps is None:
            return self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, self.config.max_steps - step))

    def chunks(self, epoch: int, epoch_steps: int) -> list[np.ndarray]:
        """The batch indices of the first ``epoch_steps`` steps of ``epoch``, one
        [steps, batch] array per dispatch: full batches in chunks of ``chunk_steps``, the
        partial batch alone."""
        key = jax.random.fold_in(self.shuffle_key, epoch)
        permutation = np.asarray(jax.random.permutation(key, self.num_train))
        batch = self.config.batch_size
        chunks, done = [], 0
        while done < epoch_steps:
            if done < self.full_batches:
                size = min(self.chunk_steps, self.full_batches - done, epoch_steps - done)
                chunks.append(permutation[done * batch : (done + size) * batch])
                chunks[-1] = chunks[-1].reshape(size, batch)
            else:
                size = 1
                chunks.append(permutation[self.full_batches * batch :][: self.remainder][None])
            done += size
        return chunks


def _train_and_evaluate(
    config: Config, workdir: Path, dataset: data_lib.Dataset | None
) -> list[dict[str, Any]]:
    _check_config(workdir, config)
    if dataset is None:
        dataset = _load_data(config)
    run, state = _set_up(config, workdir, dataset)
    metrics = metrics_lib.MetricsLog(workdir) if run.primary else _NoMetrics()
    interrupt = _InterruptFlag()
    compiled: set[tuple[int, ...]] = set()  # the shapes of the chunks compiled so far
    with (
        Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints) as checkpointer,
        interrupt.installed(),
    ):
        start_epoch, carry = _resume(run, checkpointer, metrics, state)
        step, saved_epoch = start_epoch * run.steps_per_epoch, start_epoch
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_steps = run.epoch_steps(step)
            if epoch_steps == 0:
                break
            carry, totals, timing = _train_epoch(
                run, carry, epoch, step, epoch_steps, interrupt, saved_epoch, compiled
            )
            step += epoch_steps
            record, switch_tests, eval_time = _evaluate_epoch(
                run, carry, epoch, step, epoch_steps, totals, timing
            )
            if _end_epoch(run, checkpointer, metrics, carry, record, switch_tests):
                saved_epoch = epoch
            _log_epoch(record, switch_tests, eval_time, saved_epoch)
    records = metrics.records()
    if run.primary:
        _plot(workdir)
    return records


def _load_data(config: Config) -> data_lib.Dataset:
    log.info("loading the data (%s)", config.data)
    start = time.perf_counter()
    dataset = data_lib.load_cifar10(
        config.data,
        cache_dir=config.cache_dir,
        synthetic_size=config.synthetic_size,
        seed=config.seed,
    )
    log.info(
        "loaded %d training and %d test images in %.1f s",
        len(dataset.train_labels),
        len(dataset.test_labels),
        time.perf_counter() - start,
    )
    return dataset


def _set_up(config: Config, workdir: Path, dataset: data_lib.Dataset) -> tuple[_Run, dict]:
    """The mesh, the model, the optimizer, the jitted steps and the data on the devices;
    returns the run and its initial state (params, batch stats and optimizer state)."""
    devices = _devices(config)
    if config.batch_size % len(devices):
        raise SetupError(
            f"batch_size {config.batch_size} is not divisible by the {len(devices)} devices"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P()))
    num_train = len(dataset.train_labels)
    full_batches, remainder = _epoch_batches(config.batch_size, num_train, len(devices))
    log.info("setting up %s and %s", config.model, config.opt)
    start = time.perf_counter()
    model, params, stats = init_model(config, dataset.num_classes)
    setup = make_optimizer(config, full_batches + (1 if remainder else 0))
    opt_state = setup.optimizer.init(params)
    log.info(
        "set up %s (%s parameters in %d arrays) and %s in %.1f s",
        config.model,
        f"{sum(leaf.size for leaf in jax.tree.leaves(params)):,}",
        len(jax.tree.leaves(params)),
        config.opt,
        time.perf_counter() - start,
    )
    train_chunk, evaluate = _make_steps(model, setup.optimizer, NamedSharding(mesh, P("data")))
    test = (dataset.test_images, dataset.test_labels, config.eval_batch_size, len(devices))
    shuffle_key, aug_key = jax.random.split(jax.random.key(config.seed + 1))
    run = _Run(
        config=config,
        workdir=workdir,
        setup=setup,
        train_chunk=train_chunk,
        evaluate=evaluate,
        put=put,
        train_data=put({"images": dataset.train_images, "labels": dataset.train_labels}),
        eval_data=put(_eval_batches(*test)),
        shuffle_key=shuffle_key,
        aug_key=aug_key,
        num_train=num_train,
        num_test=len(dataset.test_labels),
        full_batches=full_batches,
        remainder=remainder,
        chunk_steps=config.chunk_steps or (1 if devices[0].platform == "cpu" else 100),
        max_loss=_max_loss(config.max_train_loss, dataset.num_classes),
    )
    # Placed (replicated over every device of every process) before restoring, so that
    # Orbax restores into the same global arrays the training step uses.
    return run, put({"params": params, "batch_stats": stats, "opt_state": opt_state})


def _max_loss(max_train_loss: float | None, num_classes: int) -> float:
    """The divergence bound: by default 1000 times the loss of a uniform prediction, far
    above any loss of a run that learns (0: no bound)."""
    if max_train_loss is None:
        return 1000 * math.log(num_classes)
    return max_train_loss or math.inf


def _epoch_batches(batch_size: int, num_train: int, num_devices: int) -> tuple[int, int]:
    """The full batches of an epoch and the images of its partial last batch (0 when the
    device count does not divide them: that batch is dropped)."""
    full_batches, remainder = divmod(num_train, batch_size)
    if remainder % num_devices:
        log.warning("dropping the last partial batch (%d images) of every epoch", remainder)
        remainder = 0
    if full_batches == 0 and remainder == 0:
        raise SetupError(f"{num_train} training images are fewer than one batch")
    return full_batches, remainder


def _resume(
    run: _Run, checkpointer: Checkpointer, metrics: Any, state: dict
) -> tuple[int, tuple[Any, ...]]:
    """Restores the latest checkpoint into ``state`` and drops the records written after it;
    returns its epoch (0 without one) and the loop's carry (params, stats, opt state)."""
    start_epoch = 0
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        start_epoch, state = restored
        log.info("resumed from the checkpoint of epoch %d in %s", start_epoch, run.workdir)

    def write() -> None:
        # The configuration only once the data loaded: a typo must not pin the run.
        _write_config(run.workdir, run.config)
        partial = [r["epoch"] for r in metrics.records() if not r["complete"]]
        if partial and partial[-1] > start_epoch:
            log.info(
                "epoch %d stopped part-way last time (--max-steps) and starts again", partial[-1]
            )
        metrics.keep_epochs_up_to(start_epoch)
        metrics_lib.keep_rates_up_to(run.workdir, start_epoch)

    _write_together(run, write)
    return start_epoch, (state["params"], state["batch_stats"], state["opt_state"])


def _write_together(run: _Run, write: Callable[[], None]) -> None:
    """Runs ``write`` in process 0, which writes the run's files. With several processes,
    they then agree on whether it failed (a collective): an error there (a full disk, a
    file it cannot write) stops every process with the same message, rather than leaving
    the others waiting in their next collective until the coordination service times out."""
    if not run.multiprocess:
        write()
        return
    error = None
    if run.primary:
        try:
            write()
        except Exception as err:  # whatever it is, the other processes must hear of it
            error = err
    message = _shared_failure(error)
    if message is not None:
        raise ProcessFailedError(message) from error


def _shared_failure(error: Exception | None, size: int = 1024) -> str | None:
    """The description of the first process's error, in every process (a collective);
    None when no process had one."""
    from jax.experimental import multihost_utils

    text = b"" if error is None else describe_error(error).encode()[: size - 1]
    mine = np.zeros(size, np.uint8)
    mine[0] = error is not None
    mine[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    for index, row in enumerate(np.asarray(multihost_utils.process_allgather(mine))):
        if row[0]:
            return f"process {index}: " + bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
    return None


def _train_epoch(
    run: _Run,
    carry: tuple[Any, ...],
    epoch: int,
    first_step: int,
    epoch_steps: int,
    interrupt: _InterruptFlag,
    saved_epoch: int,
    compiled: set[tuple[int, ...]],
) -> tuple[tuple[Any, ...], np.ndarray, _EpochTime]:
    """Runs the training steps of ``epoch``, chunk by chunk, with its progress display;
    stops at a chunk boundary on Ctrl-C. Returns the carry, the epoch's loss, correct and
    image counts (on the host) and where its time went."""
    # Loss, correct and image counts of the epoch; a fresh buffer, as chunks donate it.
    carry = carry[:3] + (run.put(np.zeros(3, np.float32)),)
    chunks = run.chunks(epoch, epoch_steps)
    timing = _EpochTime()
    interval_s = math.inf if run.multiprocess else 60.0
    progress = _EpochProgress(
        epoch, epoch_steps, first_step, timing, max_loss=run.max_loss, interval_s=interval_s
    )
    with progress:
        done = 0
        stop = interrupt.requested and not run.multiprocess
        for indices in chunks:
            if stop:
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch} step {first_step + done}; run the same "
                    f"command to resume from epoch {saved_epoch + 1}"
                )
            steps = np.arange(first_step + done, first_step + done + len(indices), dtype=np.int32)
            carry = _run_chunk(run, carry, indices, steps, compiled, timing)
            done += len(indices)
            checked = progress.update(len(indices), done, carry[3], carry[2])
            # With several processes, all stop on the same step: they agree on Ctrl-C at
            # the progress checks, which every process makes on the same steps.
            if not run.multiprocess:
                stop = interrupt.requested
            elif checked:
                stop = _any_process(interrupt.requested)
    totals = np.asarray(carry[3])
    _check_loss(float(totals[0] / totals[2]), run.max_loss, epoch, first_step + epoch_steps)
    return carry, totals, timing


def _run_chunk(
    run: _Run,
    carry: tuple[Any, ...],
    indices: np.ndarray,
    steps: np.ndarray,
    compiled: set[tuple[int, ...]],
    timing: _EpochTime,
) -> tuple[Any, ...]:
    """One dispatch of the training steps of ``indices``. A chunk of a shape not seen yet
    compiles a program: it runs alone (the steps before it finished), with a log line and
    its time, which ``timing`` keeps apart from the steps'."""
    if indices.shape in compiled:
        return run.train_chunk(carry, run.put(indices), run.put(steps), *run.inputs)
    jax.block_until_ready(carry)
    if not compiled:
        log.info("compiling the training step")
    elif indices.shape[1] < run.config.batch_size:
        log.info("compiling the training step of the last, partial batch (%d images)", indices.size)
    else:
        log.info("compiling the training step for chunks of %d steps", len(indices))
    start = time.perf_counter()
    carry = run.train_chunk(carry, run.put(indices), run.put(steps), *run.inputs)
    jax.block_until_ready(carry)
    elapsed = time.perf_counter() - start
    what = "the first training step(s)" if not compiled else "it"
    log.info("compiled and ran %s in %.1f s", what, elapsed)
    compiled.add(indices.shape)
    timing.compile_s += elapsed
    timing.compile_images += indices.size
    return carry


def _evaluate_epoch(
    run: _Run,
    carry: tuple[Any, ...],
    epoch: int,
    step: int,
    epoch_steps: int,
    totals: np.ndarray,
    timing: _EpochTime,
) -> tuple[dict[str, Any], list[swats_jax.SwitchDiagnostic], float]:
    """Evaluates on the test set; returns the epoch's metrics record, the switch tests of
    a SWATS run (none otherwise) and the evaluation time."""
    params, stats, opt_state, _ = carry
    train_loss, train_correct, train_count = totals
    now = time.perf_counter()
    images_per_s = timing.images_per_s(train_count, now)
    train_time = now - timing.start
    log.info("evaluating on %d test images", run.num_test)
    eval_start = time.perf_counter()
    test_loss, test_correct = np.asarray(run.evaluate(params, stats, *run.eval_data))
    eval_time = time.perf_counter() - eval_start
    # One host transfer for every switch test (none without SWATS); it also counts the
    # switched arrays.
    switch_tests = _without_empty_gaps(swats_jax.switch_diagnostics(opt_state))
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(train_loss / train_count),
        "train_accuracy": float(train_correct / train_count),
        "test_loss": float(test_loss / run.num_test),
        "test_accuracy": float(test_correct / run.num_test),
        "learning_rate": _rounded(run.setup.learning_rate(step - 1)),
        "sgd_scale": _rounded(run.setup.sgd_scale(step - 1)),
        "num_switched": sum(test.phase == "sgd" for test in switch_tests),
        "epoch_time_s": round(train_time, 3),
        "compile_time_s": round(timing.compile_s, 3),
        "images_per_s": None if images_per_s is None else round(float(images_per_s), 1),
        "complete": epoch_steps == run.steps_per_epoch,
    }
    return record, switch_tests, eval_time


def _end_epoch(
    run: _Run,
    checkpointer: Checkpointer,
    metrics: Any,
    carry: tuple[Any, ...],
    record: dict[str, Any],
    switch_tests: list[swats_jax.SwitchDiagnostic],
) -> bool:
    """Writes what an epoch leaves: its metrics record, the switch table and tests of a
    SWATS run and, for a complete epoch, its checkpoint. Returns whether it saved one."""
    params, stats, opt_state, _ = carry
    epoch = record["epoch"]
    if run.multiprocess:
        _check_replicas_agree(params, epoch)

    def write() -> None:
        metrics.append(record)
        if run.setup.switches:
            metrics_lib.write_switch_table(run.workdir, swats_jax.switch_events(opt_state))
            metrics_lib.append_rates(run.workdir, epoch, switch_tests)

    _write_together(run, write)
    if not record["complete"]:
        return False
    checkpointer.save(epoch, {"params": params, "batch_stats": stats, "opt_state": opt_state})
    return True


def _log_epoch(
    record: dict[str, Any],
    switch_tests: list[swats_jax.SwitchDiagnostic],
    eval_time: float,
    saved_epoch: int,
) -> None:
    log.info(
        "epoch %d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %s images/s, "
        "%d arrays switched%s, evaluated in %.1f s",
        record["epoch"],
        record["train_loss"],
        record["train_accuracy"],
        record["test_loss"],
        record["test_accuracy"],
        _rate(record["images_per_s"]),
        record["num_switched"],
        _adam_gap_summary(switch_tests),
        eval_time,
    )
    if not record["complete"]:
        epoch = record["epoch"]
        log.warning(
            "stopped by --max-steps at step %d, inside epoch %d: a partial epoch is not "
            "checkpointed, so the same command restarts epoch %d from %s",
            record["step"],
            epoch,
            epoch,
            f"the checkpoint of epoch {saved_epoch}" if saved_epoch else "scratch",
        )


def _without_empty_gaps(
    tests: list[swats_jax.SwitchDiagnostic],
) -> list[swats_jax.SwitchDiagnostic]:
    """The switch tests, with NaN gaps for the arrays in Adam whose estimate equals their
    gamma exactly: the first step's test, which compares gamma with itself, is then still
    the last that ran (later ones were skipped, as after a diverging step), and its gap of
    0 would read as "about to switch"."""
    return [
        test._replace(absolute_gap=math.nan, relative_gap=math.nan)
        if test.phase == "adam" and test.absolute_gap == 0
        else test
        for test in tests
    ]


def _adam_gap_summary(tests: list[swats_jax.SwitchDiagnostic]) -> str:
    """For the epoch line: the median relative gap of the switch tests of the arrays still
    in Adam (how far they are from switching; ``rates.csv`` has every array's)."""
    if not tests:
        return ""
    gaps = [t.relative_gap for t in tests if t.phase == "adam"]
    if not gaps:
        return " (none left in Adam)"
    measured = [g for g in gaps if math.isfinite(g)]
    if not measured:
        return f" ({len(gaps)} in Adam, no switch test yet)"
    return f" (median relative gap {np.median(measured):.2g} over the {len(gaps)} in Adam)"


def _rounded(value: Any) -> float:
    """A float32 schedule value as the decimal it stands for (1e-3, not 0.0010000000474974513)."""
    return float(f"{float(value):.7g}")


def _plot(workdir: Path) -> None:
    from train import plots  # here, so that importing the trainer does not load Matplotlib

    try:
        plots.plot_runs([workdir], workdir / "test_accuracy.png")
    except (ValueError, OSError) as err:  # a plot is a convenience: never lose a run to it
        log.warning("could not plot %s: %s", workdir, err)
