"""Steady-state CPU training speed: the trainer's own step against a PyTorch step, one run.

Run: ``python benchmarks/cpu_train_speed.py [--widths 8,32,64] [--steps 6]``.

Per width, ResNet-18 (CIFAR layout, channels ``width``, ``2 width``, ``4 width``, ``8 width``),
batch 128, float32, swats_local:

- ``trainer``: ``train.trainer.train_and_evaluate`` on synthetic data for one epoch of
  ``--steps`` + 1 steps; its ``images_per_s``, which leaves out the step that compiled (the
  trainer dispatches one jitted step at a time on CPU: forward, backward, optimizer,
  augmentation included).
- ``pytorch``: the independent PyTorch ResNet-18 of ``tests/torch_models.py`` with
  ``pytorch-swats``'s SWATS (the reference global code's optimizer), NCHW, the same batch
  size, forward + backward + step on a fixed random batch, after two warm-up steps; the
  median of ``--steps`` steps.

Both use every core of the machine (``torch.set_num_threads(os.cpu_count())``; XLA:CPU's
default). The trainer runs with the XLA:CPU options it sets for itself (``train/xla_cpu.py``);
``trainer, XLA defaults`` runs it again in a subprocess with ``SWATS_JAX_XLA_DEFAULTS=1``
(XLA's own defaults), and each ``--xla-flags`` value in a subprocess under exactly those
XLA_FLAGS, to compare XLA:CPU options in the same run.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import xla_cpu  # noqa: E402  (after the path, before JAX computes anything)

BATCH = 128


def trainer_images_per_s(width: int, steps: int) -> float:
    """The trainer's steady-state images/s at ``width`` (compile excluded)."""
    from train.config import Config
    from train.trainer import train_and_evaluate

    config = Config(
        model="resnet18",
        opt="swats_local",
        data="synthetic",
        synthetic_size=(BATCH * (steps + 1), BATCH),
        batch_size=BATCH,
        eval_batch_size=BATCH,
        width=width,
        epochs=1,
    )
    with tempfile.TemporaryDirectory() as workdir:
        records = train_and_evaluate(config, workdir)
    return records[-1]["images_per_s"]


def pytorch_step_s(
    width: int, steps: int, *, optimizer: bool = True, without_batchnorm: bool = False
) -> float:
    """The median time in seconds of ``steps`` PyTorch ResNet-18 steps at ``width``, after
    two warm-ups, on every core: forward and backward on a fixed random batch and, with
    ``optimizer``, a step of ``pytorch-swats``'s SWATS; ``without_batchnorm`` replaces every
    BatchNorm with an identity."""
    import swats
    import torch

    # pytorch-swats calls a deprecated overload of Tensor.add_ on every step.
    warnings.filterwarnings("ignore", category=UserWarning, module="swats")

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_models import TorchResNet18

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    net = TorchResNet18(width)
    if without_batchnorm:
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, name, torch.nn.Identity())
    swats_step = swats.SWATS(net.parameters(), lr=1e-3) if optimizer else None
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.randint(0, 10, (BATCH,))
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        if swats_step is not None:
            swats_step.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pytorch_images_per_s(width: int, steps: int) -> float:
    """PyTorch's steady-state images/s for the same model, batch and optimizer."""
    return BATCH / pytorch_step_s(width, steps)


def json_from_a_fresh_process(code: str, environ: dict[str, str]) -> Any:
    """What Python ``code``, run in a fresh process from the repository's root with
    ``environ`` (and the repository on PYTHONPATH), printed as JSON on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _trainer_under_flags(flags: str, width: int, steps: int) -> float:
    """``trainer_images_per_s`` in a fresh process whose XLA_FLAGS are exactly ``flags``."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import cpu_train_speed as b; "
        f"print(json.dumps(b.trainer_images_per_s({width}, {steps})))"
    )
    return json_from_a_fresh_process(code, {**os.environ, "XLA_FLAGS": flags, xla_cpu.OPT_OUT: "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="8,32,64")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument(
        "--xla-flags", action="append", default=[], help="XLA_FLAGS to compare (repeatable)"
    )
    args = parser.parse_args()
    tuned = " ".join(xla_cpu.tune()) or "none"

    import jax
    import torch

    print(
        f"# cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}, torch {torch.__version__}; ResNet-18, batch {BATCH}, float32, "
        f"swats_local (trainer) / pytorch-swats SWATS (PyTorch); median of {args.steps} steps; "
        f"trainer's XLA:CPU options: {tuned}"
    )
    variants = ["", *args.xla_flags]  # "": XLA's defaults
    columns = ["trainer"] + [
        f"trainer, XLA_FLAGS={flags}" if flags else "trainer, XLA defaults" for flags in variants
    ]
    print(
        "| width | pytorch images/s | "
        + " | ".join(f"{c} images/s | vs pytorch" for c in columns)
        + " |"
    )
    print("|---:|---:|" + "---:|---:|" * len(columns))
    for width in map(int, args.widths.split(",")):
        reference = pytorch_images_per_s(width, args.steps)
        ours = [trainer_images_per_s(width, args.steps)]
        ours += [_trainer_under_flags(flags, width, args.steps) for flags in variants]
        cells = " | ".join(f"{rate:,.1f} | {rate / reference:.2f}x" for rate in ours)
        print(f"| {width} | {reference:,.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
