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

import swats_jax
from train import data as data_lib
from train import metrics as metrics_lib
from train import models
from train.checkpoint import Checkpointer
from train.config import MAY_CHANGE_ON_RESUME, Config, make_optimizer
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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that state."""


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


class _EpochProgress:
    """An epoch's progress: a bar in a terminal, log lines otherwise.

    About every 10% of the epoch, and at least every ``interval_s`` seconds, it reads the
    running loss (a host transfer) and stops the run if it is not finite. Without a terminal
    it then logs the step, the loss, images/s and the number of switched arrays. With several
    processes, pass ``interval_s=math.inf``: every process then checks on the same steps, so
    that all stop together.
    """

    def __init__(self, epoch: int, total: int, first_step: int, *, interval_s: float = 60.0):
        self.epoch, self.total, self.first_step = epoch, total, first_step
        self.every = max(1, math.ceil(total / 10))
        self.next_report = self.every
        self.interval_s = interval_s
        self.start = self.last_report = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=True)

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
        _check_finite(loss, self.epoch, self.first_step + done)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif done < self.total:  # the epoch's own line reports its end
            log.info(
                "epoch %d: step %d/%d, train loss %.4f, %.0f images/s, %d arrays switched",
                self.epoch,
                done,
                self.total,
                loss,
                count / (now - self.start),
                swats_jax.num_switched(opt_state),
            )
        return True

    def __enter__(self) -> _EpochProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss became {loss} by step {step} (epoch {epoch}); stopped without "
            "saving this state: lower --lr, or check the data"
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

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf.addressable_shards[0].data).tobytes())
    try:
        multihost_utils.assert_equal(np.frombuffer(digest.digest(), np.uint8))
    except AssertionError as err:
        raise ReplicaMismatchError(
            f"the processes hold different parameters after epoch {epoch}; check that every "
            "process runs the same command on the same data and software"
        ) from err


class _NoMetrics:
    """The metrics log of a process other than process 0, which writes nothing."""

    def records(self) -> list[dict[str, Any]]:
        return []

    def keep_epochs_up_to(self, epoch: int) -> None:
        pass

    def append(self, record: dict[str, Any]) -> None:
        pass


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
            f"cannot write to the workdir {workdir}: {err.strerror or err}; use another --workdir"
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
      train.checkpoint.CheckpointError: checkpoints exist but none can be restored.
      NonFiniteLossError: the training loss became NaN or infinite (nothing of it is saved).
      TrainingInterrupted: Ctrl-C; the run stopped at a step boundary.
    """
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


def _train_and_evaluate(
    config: Config, workdir: Path, dataset: data_lib.Dataset | None
) -> list[dict[str, Any]]:
    # With several processes (jax.distributed), process 0 writes the run's files; all
    # processes save and restore the checkpoints together, as Orbax expects.
    primary = jax.process_index() == 0
    multiprocess = jax.process_count() > 1
    _check_config(workdir, config)
    if dataset is None:
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
    if primary:
        _write_config(workdir, config)  # only once the data loaded: a typo must not pin the run

    devices = _devices(config)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    if config.batch_size % len(devices):
        raise SetupError(
            f"batch_size {config.batch_size} is not divisible by the {len(devices)} devices"
        )

    chunk_steps = config.chunk_steps or (1 if devices[0].platform == "cpu" else 100)
    num_train = len(dataset.train_labels)
    full_batches, remainder = divmod(num_train, config.batch_size)
    if remainder % len(devices):
        log.warning("dropping the last partial batch (%d images) of every epoch", remainder)
        remainder = 0
    steps_per_epoch = full_batches + (1 if remainder else 0)
    if steps_per_epoch == 0:
        raise SetupError(f"{num_train} training images are fewer than one batch")

    model, params, stats = init_model(config, dataset.num_classes)
    setup = make_optimizer(config, steps_per_epoch)
    opt_state = setup.optimizer.init(params)
    train_chunk, evaluate = _make_steps(model, setup.optimizer, batch_sharding)

    put = functools.partial(jax.device_put, device=replicated)
    train_data = put({"images": dataset.train_images, "labels": dataset.train_labels})
    eval_data = put(
        _eval_batches(
            dataset.test_images, dataset.test_labels, config.eval_batch_size, len(devices)
        )
    )
    shuffle_key, aug_key = jax.random.split(jax.random.key(config.seed + 1))

    # Placed (replicated over every device of every process) before restoring, so that
    # Orbax restores into the same global arrays the training step uses.
    state = put({"params": params, "batch_stats": stats, "opt_state": opt_state})
    metrics = metrics_lib.MetricsLog(workdir) if primary else _NoMetrics()
    start_epoch = 0
    interrupt = _InterruptFlag()
    with (
        Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints) as checkpointer,
        interrupt.installed(),
    ):
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            start_epoch, state = restored
            log.info("resumed from the checkpoint of epoch %d in %s", start_epoch, workdir)
        partial = [r["epoch"] for r in metrics.records() if not r["complete"]]
        if partial and partial[-1] > start_epoch:
            log.info(
                "epoch %d stopped part-way last time (--max-steps) and starts again", partial[-1]
            )
        metrics.keep_epochs_up_to(start_epoch)
        if primary:
            metrics_lib.keep_rates_up_to(workdir, start_epoch)
        carry = (state["params"], state["batch_stats"], state["opt_state"])
        step = start_epoch * steps_per_epoch
        saved_epoch = start_epoch
        compiled = False

        for epoch in range(start_epoch + 1, config.epochs + 1):
            if config.max_steps is not None and step >= config.max_steps:
                break
            epoch_steps = steps_per_epoch
            if config.max_steps is not None:
                epoch_steps = min(epoch_steps, config.max_steps - step)
            start_time = time.perf_counter()
            permutation = np.asarray(
                jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_train)
            )
            # Loss, correct and image counts of the epoch; a fresh buffer, as chunks donate it.
            carry = carry[:3] + (put(np.zeros(3, np.float32)),)
            interval_s = math.inf if multiprocess else 60.0
            with _EpochProgress(epoch, epoch_steps, step, interval_s=interval_s) as progress:
                done = 0
                stop = interrupt.requested and not multiprocess
                while done < epoch_steps:
                    if stop:
                        raise TrainingInterrupted(
                            f"interrupted at epoch {epoch} step {step + done}; run the same "
                            f"command to resume from epoch {saved_epoch + 1}"
                        )
                    # Full batches go through chunks of `chunk_steps`; the partial batch alone.
                    if done < full_batches:
                        size = min(chunk_steps, full_batches - done, epoch_steps - done)
                        batch = config.batch_size
                        idx = permutation[done * batch : (done + size) * batch]
                        idx = idx.reshape(size, batch)
                    else:
                        size = 1
                        idx = permutation[full_batches * config.batch_size :][:remainder][None]
                    steps = np.arange(step + done, step + done + size, dtype=np.int32)
                    if not compiled:
                        log.info("compiling the training step")
                        compile_start = time.perf_counter()
                    carry = train_chunk(carry, put(idx), put(steps), train_data, aug_key)
                    if not compiled:
                        jax.block_until_ready(carry)
                        log.info(
                            "compiled and ran the first training step(s) in %.1f s",
                            time.perf_counter() - compile_start,
                        )
                        compiled = True
                    done += size
                    checked = progress.update(size, done, carry[3], carry[2])
                    # With several processes, all stop on the same step: they agree on
                    # Ctrl-C at the progress checks, which every process makes on the same steps.
                    if not multiprocess:
                        stop = interrupt.requested
                    elif checked:
                        stop = _any_process(interrupt.requested)
            step += epoch_steps
            params, stats, opt_state, train_totals = carry
            train_loss, train_correct, train_count = np.asarray(train_totals)
            train_time = time.perf_counter() - start_time
            _check_finite(float(train_loss / train_count), epoch, step)
            log.info("evaluating on %d test images", len(dataset.test_labels))
            eval_start = time.perf_counter()
            test_loss, test_correct = np.asarray(evaluate(params, stats, *eval_data))
            eval_time = time.perf_counter() - eval_start
            num_test = len(dataset.test_labels)
            complete = epoch_steps == steps_per_epoch
            # One host transfer for every switch test (none without SWATS); it also counts
            # the switched arrays.
            switch_tests = swats_jax.switch_diagnostics(opt_state)
            record = {
                "epoch": epoch,
                "step": step,
                "train_loss": float(train_loss / train_count),
                "train_accuracy": float(train_correct / train_count),
                "test_loss": float(test_loss / num_test),
                "test_accuracy": float(test_correct / num_test),
                "learning_rate": _rounded(setup.learning_rate(step - 1)),
                "sgd_scale": _rounded(setup.sgd_scale(step - 1)),
                "num_switched": sum(test.phase == "sgd" for test in switch_tests),
                "epoch_time_s": round(train_time, 3),
                "images_per_s": round(float(train_count) / train_time, 1),
                "complete": complete,
            }
            if multiprocess:
                _check_replicas_agree(params, epoch)
            metrics.append(record)
            if primary and config.opt.startswith("swats"):
                metrics_lib.write_switch_table(workdir, swats_jax.switch_events(opt_state))
                metrics_lib.append_rates(workdir, epoch, switch_tests)
            if complete:
                checkpointer.save(
                    epoch, {"params": params, "batch_stats": stats, "opt_state": opt_state}
                )
                saved_epoch = epoch
            log.info(
                "epoch %d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %.0f images/s, "
                "%d arrays switched%s, evaluated in %.1f s",
                epoch,
                record["train_loss"],
                record["train_accuracy"],
                record["test_loss"],
                record["test_accuracy"],
                record["images_per_s"],
                record["num_switched"],
                _adam_gap_summary(switch_tests),
                eval_time,
            )
            if not complete:
                log.warning(
                    "stopped by --max-steps at step %d, inside epoch %d: a partial epoch is "
                    "not checkpointed, so the same command restarts epoch %d from %s",
                    step,
                    epoch,
                    epoch,
                    f"the checkpoint of epoch {saved_epoch}" if saved_epoch else "scratch",
                )
    records = metrics.records()
    if primary:
        _plot(workdir)
    return records


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
