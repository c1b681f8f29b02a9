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
#       jupytext_version: 1.19.6
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
# using the reference recipes of the published runs (`train.config.make_optimizer`), then
# plots the test accuracy of all runs, their training loss, the per-layer switch table and
# when each layer switched, and compares the final accuracies with the published ones.
#
# All the training logic lives in the package (`train.trainer.train_and_evaluate`, the code
# behind `python -m train.cifar`); this notebook only chooses the runs and shows the results.
#
# **Runtime**: use a GPU (Runtime > Change runtime type). A full run is 200 epochs per
# optimizer, hours on a Colab GPU. Runs write a checkpoint every epoch into `workdir`; on
# Colab the default workdir is on your Google Drive, so after a disconnect, run the
# notebook again with the same parameters: every run resumes from its last checkpoint.

# %% tags=["parameters"]
optimizers = ["swats_local", "swats_global", "adabound"]  # one run each; also "adam", "sgd"
workdir = None  # None: Google Drive on Colab (survives a disconnect), else ./runs
# The options of every run, as in `python -m train.cifar --help` (train.config.Config):
model = "resnet18"  # or "densenet121"
epochs = 200  # the published runs use 200
batch_size = 128
lr = None  # Adam-phase (or base) learning rate; None: the recipe's
recipe = "reference"  # the published phase schedules; "none": constant rates
swats_momentum = None  # SGD recursion of swats_global ("paper", "reference"); None: the recipe's
data = "cifar10"  # downloaded; a cifar-10-batches-py folder; an image-folder archive; "synthetic"
dtype = "float32"  # or "bfloat16" compute
seed = 0
max_steps = None  # stop each run after this many steps (smoke runs)
width = None  # a narrower model (ResNet base width / DenseNet growth rate), for quick looks
eval_batch_size = 1000
chunk_steps = None  # training steps per compiled chunk; None: 100 on GPU/TPU, 1 on CPU
keep_checkpoints = 3  # epoch checkpoints kept per run
cache_dir = None  # downloads and decoded data; None: ~/.cache/swats_jax
synthetic_size = [1024, 256]  # train and test images of the synthetic data
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
from train import plots
from train.config import PUBLISHED_TEST_ACCURACY, Config
from train.trainer import train_and_evaluate

# The trainer's one line per epoch; other libraries' logs stay at warnings.
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
logging.getLogger("train").setLevel(logging.INFO)
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


root = Path(workdir) if workdir is not None else default_workdir()
run_dirs = {opt: root / f"{opt}-{model}" for opt in optimizers}
print("runs:", *run_dirs.values(), sep="\n  ")

# %% [markdown]
# ## Data
#
# `cifar10` comes through TensorFlow Datasets where TensorFlow is installed (as on Colab),
# otherwise from the official archive (MD5-checked and cached). It is loaded once and held
# on the accelerator; augmentation runs inside the compiled training step.

# %%
dataset = data_lib.load_cifar10(
    data, cache_dir=cache_dir, synthetic_size=tuple(synthetic_size), seed=seed
)
print(
    f"{len(dataset.train_labels)} training and {len(dataset.test_labels)} test images, "
    f"classes {', '.join(dataset.class_names)}"
)

# %% [markdown]
# ## Training
#
# One run per optimizer, each in its own folder of `workdir`. A finished run is not
# repeated: its metrics are read back from its folder.

# %%
results = {}
for opt in optimizers:
    # The run options are the parameters above, one per field of Config but `opt`.
    config = Config.from_values(globals(), opt=opt)
    print(f"--- {opt}: {config}")
    results[opt] = train_and_evaluate(config, run_dirs[opt], dataset=dataset)

# %% [markdown]
# ## Test accuracy and training loss per epoch

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
# test switched the whole network.

# %%
for opt, run_dir in run_dirs.items():
    if not opt.startswith("swats"):
        continue
    table = (run_dir / "switches.md").read_text()
    display(Markdown(f"### {opt}\n\n{table}"))
    display(Image(plots.plot_switches(run_dir, figures / f"switches-{opt}.png")))

# %% [markdown]
# ## Results next to the published numbers
#
# The published numbers are final test accuracies after 200 epochs of the reference
# recipes (single runs); a shorter or narrower run is not comparable with them.

# %%
rows = [
    "| optimizer | epochs | final test accuracy | best | published |",
    "|---|---:|---:|---:|---:|",
]
for opt, records in results.items():
    final, best = records[-1]["test_accuracy"], max(r["test_accuracy"] for r in records)
    published = PUBLISHED_TEST_ACCURACY.get((model, opt))
    published = "" if published is None else f"{published:.2f}"
    rows.append(
        f"| {opt} | {records[-1]['epoch']} | {100 * final:.2f} | {100 * best:.2f} | {published} |"
    )
display(Markdown("\n".join(rows)))
