"""Command line: ``python -m train.cifar --opt=swats_local [--model=resnet18] ...``.

Parses flags into a :class:`train.config.Config` and calls
:func:`train.trainer.train_and_evaluate`. See ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import typing

from train import config as config_lib

# Exit statuses (docs/training.md, "Progress, interrupts and exit codes").
EXIT_ERROR = 2  # bad flags or input: data, workdir, configuration, checkpoints, disk
EXIT_NON_FINITE = 3  # the training loss became NaN or infinite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
INTERRUPTED = "interrupted; run the same command to resume from the last checkpoint"
# The top-level modules of the trainer's extra (pip install ".[train]"), beyond JAX and Optax.
TRAIN_EXTRA_MODULES = frozenset({"flax", "orbax", "PIL", "matplotlib", "tqdm"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` (the help says what unset means), tuples as typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help
        if isinstance(action.default, tuple):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _add_option(parser, field: dataclasses.Field) -> None:
    """The flag of a :class:`Config` field: ``--batch-size`` for ``batch_size``, typed by
    its annotation (``X | None``: an ``X``, unset by default; ``tuple[int, int]``: two ints)."""
    annotation = config_lib.field_types()[field.name]
    if config_lib.is_optional(annotation):
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    kwargs = {}
    if typing.get_origin(annotation) is tuple:
        element_types = typing.get_args(annotation)
        kwargs["nargs"] = len(element_types)
        (annotation,) = set(element_types)  # one type for all the values
    help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
    if field.metadata["may_change_on_resume"]:
        help_text += "; may change when a run resumes"
    parser.add_argument(
        f"--{field.name.replace('_', '-')}",
        type=annotation,
        choices=field.metadata["choices"],
        default=field.default,
        metavar=field.metadata["metavar"],
        help=help_text,
        **kwargs,
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m train.cifar",
        usage="%(prog)s [-h] [--workdir WORKDIR] [--OPTION VALUE ...]",
        description="Train a CIFAR-10 model with SWATS, AdaBound, Adam or SGD.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--workdir", default="runs/cifar10", help="outputs and checkpoints")
    hosts = parser.add_argument_group(
        "several processes (jax.distributed)",
        "One process per host (or per GPU), each with the same command and data: the batch is "
        "sharded over every device of every process. Process 0 writes the run's files; the "
        "workdir must be one shared folder.",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() and let it read the cluster's settings "
        "(SLURM, Open MPI, Kubernetes/GKE, Cloud TPU); or give the three flags below",
    )
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    options = parser.add_argument_group(
        "run configuration",
        "Saved as WORKDIR/config.json. A run resumes from its last checkpoint in WORKDIR "
        "only with the same configuration, except the options that may change.",
    )
    for field in dataclasses.fields(config_lib.Config):
        _add_option(options, field)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_lib.Config.from_values(vars(args))
    except ValueError as err:
        parser.error(str(err))

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in explicit) and None in explicit:
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        parser.error(
            f"--process-id must be in 0..{args.num_processes - 1} for --num-processes "
            f"{args.num_processes}, got {args.process_id}"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("train").setLevel(logging.INFO)
    from train import xla_cpu  # before JAX creates its backends, which read XLA_FLAGS

    xla_cpu.tune()
    if args.distributed or args.coordinator is not None:
        try:
            index = _start_distributed(args)
        except (RuntimeError, ValueError) as err:  # no coordinator, no cluster detected, ...
            message = " ".join(str(err).split())[:300]
            return _fail(parser.prog, f"cannot join the other processes: {message}", EXIT_ERROR)
        if index != 0:  # other processes log warnings and errors only
            logging.getLogger("train").setLevel(logging.WARNING)
    # Imported here so that --help and flag errors answer without loading JAX.
    try:
        from train import trainer
        from train.checkpoint import CheckpointError
        from train.data import DatasetError
    except ImportError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        message = f"the trainer needs its extra: pip install '.[train]' (no module {err.name})"
        return _fail(parser.prog, message, EXIT_ERROR)

    announce = _once(lambda: _fail(parser.prog, INTERRUPTED, EXIT_INTERRUPTED, ""))
    try:
        with _second_interrupt_stops_at_once(announce):
            trainer.train_and_evaluate(config, args.workdir)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        announce()
        return EXIT_INTERRUPTED
    except Exception as err:
        handled = _exit_status(err, trainer, (DatasetError, CheckpointError))
        if handled is None:
            raise
        message, code, kind = handled
        return _fail(parser.prog, message, code, kind)
    return 0


def _exit_status(
    error: Exception, trainer: typing.Any, expected: tuple[type[Exception], ...]
) -> tuple[str, int, str] | None:
    """The line (without the program's name), exit status and kind (``"error: "`` or
    none) of an error of the trainer; None for an unexpected one (a bug: its traceback)."""
    expected = (
        *expected,
        trainer.WorkdirError,
        trainer.SetupError,
        trainer.ReplicaMismatchError,
        trainer.ConfigMismatchError,
        trainer.MetricsError,
        trainer.ProcessFailedError,
    )
    if isinstance(error, expected):
        return str(error), EXIT_ERROR, "error: "
    if isinstance(error, OSError):  # a full disk, a folder removed under the run, ...
        return trainer.describe_error(error), EXIT_ERROR, "error: "
    if isinstance(error, trainer.NonFiniteLossError):  # DivergedError included
        return str(error), EXIT_NON_FINITE, "error: "
    if isinstance(error, trainer.TrainingInterrupted):
        return str(error), EXIT_INTERRUPTED, ""
    return None


def _once(function: typing.Callable[[], object]) -> typing.Callable[[], None]:
    """``function``, called by the first caller only (of any thread)."""
    called = threading.Lock()

    def once() -> None:
        if called.acquire(blocking=False):
            function()
            sys.stderr.flush()

    return once


@contextlib.contextmanager
def _second_interrupt_stops_at_once(announce: typing.Callable[[], None]):
    """A second Ctrl-C ends the process at once, exit 130, wherever it is.

    The first asks the trainer to stop at the next step boundary. Python runs its signal
    handlers between bytecodes of the main thread, so one raising KeyboardInterrupt waits
    for XLA's compiler or any other long C call to return (and unwinding from there has
    crashed the process). The C-level handler also writes each signal's number to the
    wakeup file descriptor: a thread reading it sees the second Ctrl-C as it comes, calls
    ``announce`` (which says so on one line) and exits.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    with contextlib.ExitStack() as stack:
        # Unwound in reverse: the wakeup fd restored, the writer closed (which ends the
        # watcher), the watcher joined, the reader closed, even if a KeyboardInterrupt
        # comes during one of them.
        reader, writer = socket.socketpair()
        stack.callback(reader.close)
        stack.callback(writer.close)
        writer.setblocking(False)

        def watch() -> None:
            count = 0
            while data := reader.recv(64):  # empty once the writer is closed
                count += data.count(signal.SIGINT)
                if count >= 2:
                    announce()
                    os._exit(EXIT_INTERRUPTED)

        watcher = threading.Thread(target=watch, name="second-ctrl-c", daemon=True)
        watcher.start()
        stack.callback(watcher.join)
        stack.callback(writer.shutdown, socket.SHUT_WR)  # recv in the watcher returns b""
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        stack.callback(signal.set_wakeup_fd, previous)
        yield


def _start_distributed(args: argparse.Namespace) -> int:
    """Joins the processes of a multi-process run; returns this process's index."""
    import os

    import jax

    # Multi-process collectives between CPU devices (tests, CPU clusters) need an
    # implementation; GPUs and TPUs have their own.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return jax.process_index()


def _fail(prog: str, message: str, code: int, kind: str = "error: ") -> int:
    print(f"{prog}: {kind}{message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
