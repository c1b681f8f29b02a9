# ---
# jupyter:
#   accelerator: GPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SWATS on CIFAR-10: reproducing the published comparison
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/swats-jax/swats-jax/blob/main/colab/swats_cifar10.ipynb)
#
# Trains ResNet-18 (or DenseNet-121) on CIFAR-10 with SWATS, local and global, and AdaBound,
# using the reference recipes of the published runs (`train.config.make_optimizer`), once
# per seed in `seeds`, then plots the test accuracy of all runs (mean ± std over seeds),
# their training loss, the per-layer switch table and when each layer switched, and compares
# the final accuracies (mean ± std over seeds) with the published ones.
#
# All the training logic lives in the package (`train.trainer.train_and_evaluate`, the code
# behind `python -m train.cifar`); this notebook only chooses the runs and shows the results.
#
# **Runtime**: use a GPU (Runtime > Change runtime type). A full run is 200 epochs per
# optimizer and seed, hours on a Colab GPU. Runs write a checkpoint every epoch into
# `workdir`; on Colab the default workdir is on your Google Drive, so after a disconnect, run
# the notebook again with the same parameters: every run resumes from its last checkpoint.

# %% tags=["parameters"]
optimizers = ["swats_local", "swats_global", "adabound"]  # also "adam", "sgd"
seeds = [0]  # one run per optimizer and seed: e.g. [0, 1, 2] for mean ± std over seeds
workdir = None  # None: Google Drive on Colab (survives a disconnect), else ./runs
# The options of every run, as in `python -m train.cifar --help` (train.config.Config),
# but `opt` and `seed`, which each run takes from `optimizers` and `seeds`:
model = "resnet18"  # or "densenet121"
epochs = 200  # the published runs use 200
batch_size = 128
lr = None  # Adam-phase (or base) learning rate; None: the recipe's
recipe = "reference"  # the published phase schedules; "none": constant rates
swats_momentum = None  # SGD recursion of swats_global ("paper", "reference"); None: the recipe's
data = "cifar10"  # downloaded; a cifar-10-batches-py folder; an image-folder archive; "synthetic"
dtype = "float32"  # or "bfloat16" compute
max_steps = None  # stop each run after this many steps (smoke runs)
width = None  # a narrower model (ResNet base width / DenseNet growth rate), for quick looks
eval_batch_size = 1000
chunk_steps = None  # training steps per compiled chunk; None: 100 on GPU/TPU, 1 on CPU
keep_checkpoints = 3  # epoch checkpoints kept per run
cache_dir = None  # downloads and decoded data; None: ~/.cache/swats_jax
synthetic_size = [1024, 256]  # train and test images of the synthetic data
max_train_loss = None  # stop a run whose training loss exceeds it; None: 1000 x ln(classes)
num_devices = None  # data parallel over the first N devices; None: all

# %% [markdown]
# ## Setup
#
# Where `swats_jax` cannot be imported, as on a fresh Colab, the next cell installs it and
# its trainer from GitHub:
# `pip install "swats-jax[train] @ git+https://github.com/swats-jax/swats-jax"`.
# From a clone of the repository, install the clone instead, before starting Jupyter:
# `pip install -e ".[train]"` in its folder.

# %%
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("swats_jax") is None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "swats-jax[train] @ git+https://github.com/swats-jax/swats-jax",
        ],
        check=True,
    )
    importlib.invalidate_caches()  # so that this kernel finds the new packages

# %%
import logging
from pathlib import Path

import jax
from IPython.display import Image, Markdown, display

from train import data as data_lib
from train import plots, results, xla_cpu
from train.config import Config
from train.trainer import train_and_evaluate

# The trainer's one line per epoch; other libraries' logs stay at warnings.
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
logging.getLogger("train").setLevel(logging.INFO)
# The XLA:CPU options python -m train.cifar sets (a faster CPU step), before JAX starts.
xla_cpu.tune()
print(f"JAX {jax.__version__}, devices: {jax.devices()}")
if jax.default_backend() == "cpu":
    print("No GPU found: training runs on the CPU, far too slowly for full runs (on Colab:")
    print("Runtime > Change runtime type > GPU).")


def default_workdir() -> Path:
    """Google Drive on Colab, so that checkpoints survive a disconnect; else ./runs."""
    try:
        from google.colab import drive
    except ImportError:
        return Path("runs")
    drive.mount("/content/drive")
    return Path("/content/drive/MyDrive/swats-jax/runs")


given_seeds = seeds
seeds = [seeds] if isinstance(seeds, int) else list(seeds)
if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
    raise ValueError(f"seeds must be a list of distinct integers, got {given_seeds!r}")


def run_name(opt: str, seed: int) -> str:
    """The folder of a run; seed 0 keeps the name of single-seed runs, so that they resume."""
    return f"{opt}-{model}" if seed == 0 else f"{opt}-{model}-seed{seed}"


root = Path(workdir) if workdir is not None else default_workdir()
run_dirs = {(opt, seed): root / run_name(opt, seed) for opt in optimizers for seed in seeds}
print("runs:", *run_dirs.values(), sep="\n  ")

# %% [markdown]
# ## Data
#
# `cifar10` comes through TensorFlow Datasets where TensorFlow is installed (as on Colab),
# otherwise from the official archive (MD5-checked and cached). It is loaded once (synthetic
# data: once per seed, which draws it) and held on the accelerator; augmentation runs inside
# the compiled training step.


# %%
def load_data(seed: int) -> data_lib.Dataset:
    """The dataset of a run: only the synthetic data depends on the seed, as with
    `python -m train.cifar --seed`."""
    return data_lib.load_cifar10(
        data, cache_dir=cache_dir, synthetic_size=tuple(synthetic_size), seed=seed
    )


dataset = load_data(seeds[0])
print(
    f"{len(dataset.train_labels)} training and {len(dataset.test_labels)} test images, "
    f"classes {', '.join(dataset.class_names)}"
)

# %% [markdown]
# ## Training
#
# One run per optimizer and seed, each in its own folder of `workdir`: `{opt}-{model}` for
# seed 0, `{opt}-{model}-seed{seed}` for the others. Seed by seed, every optimizer, so that
# an interrupted session already holds whole comparisons for its first seeds. A finished run
# is not repeated: its metrics are read back from its folder.

# %%
for seed in seeds:
    run_data = load_data(seed) if data == "synthetic" and seed != seeds[0] else dataset
    for opt in optimizers:
        # The run options are the parameters above, one per field of Config but `opt` and
        # `seed`.
        config = Config.from_values(globals(), opt=opt, seed=seed)
        print(f"--- {opt}, seed {seed}: {config}")
        train_and_evaluate(config, run_dirs[opt, seed], dataset=run_data)

# %% [markdown]
# ## Test accuracy and training loss per epoch
#
# With several seeds, each optimizer is one line, the mean over its seeds, in a band of ± the
# standard deviation (over the epochs that all its seeds reached).

# %%
figures = root / f"figures-{model}"
runs = list(run_dirs.values())
display(Image(plots.plot_runs(runs, figures / "test_accuracy.png")))
display(Image(plots.plot_runs(runs, figures / "train_loss.png", metric="train_loss")))

# %% [markdown]
# ## Per-layer switches
#
# For each SWATS run: the layers in the order they switched to SGD, the step of the
# switch and the SGD rate adopted (before the recipe's late rate drops), as in the local
# study's table; then the same as a plot. The global variant reports the one layer whose
# test switched the whole network. One table and plot per seed.

# %%
for (opt, seed), run_dir in run_dirs.items():
    if not opt.startswith("swats"):
        continue
    table = (run_dir / "switches.md").read_text()
    display(Markdown(f"### {opt}, seed {seed}\n\n{table}"))
    name = opt if seed == 0 else f"{opt}-seed{seed}"
    display(Image(plots.plot_switches(run_dir, figures / f"switches-{name}.png")))

# %% [markdown]
# ## Results next to the published numbers
#
# Final and best test accuracy of each optimizer as mean ± std (n) over its seeds (the
# sample standard deviation; — for a single seed), as `python -m train.results` prints it.
# The published numbers are final test accuracies after 200 epochs of the reference recipes
# (single runs); a shorter or narrower run is not comparable with them.

# %%
display(Markdown(results.results_table(list(run_dirs.values()))))
