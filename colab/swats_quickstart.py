# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# # SWATS in a few minutes: switching from Adam to SGD with Optax
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/swats-jax/swats-jax/blob/main/colab/swats_quickstart.ipynb)
#
# SWATS ([Keskar & Socher, 2017](https://arxiv.org/abs/1712.07628)) starts with Adam and,
# once an estimate of the SGD learning rate that matches Adam's steps has settled, carries
# on with plain SGD at that rate. `swats_jax` offers it as Optax transformations:
#
# - `swats_local()`: every parameter array decides on its own when to switch;
# - `swats_global()`: the whole network switches when the first array's test passes.
#
# This notebook runs on a CPU in a few minutes: a small network on a toy problem, the
# switch events, the effect of the switch tolerance, how far each array is from switching,
# and local against global switching.
# The CIFAR-10 reproduction is in `swats_cifar10.ipynb`.

# %% tags=["parameters"]
steps = 3000  # optimizer steps per run
learning_rate = 1e-3  # Adam-phase learning rate
seed = 0

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
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Markdown, display

import swats_jax

print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, optax {optax.__version__}")

# %% [markdown]
# ## A small problem
#
# Three interleaved noisy spirals in the plane, split into a training and a test set, and a
# two-hidden-layer tanh network: six parameter arrays (`dense0/w`, `dense0/b`, ...), so six
# leaves that can each switch.


# %%
def make_spirals(key, per_class=400, classes=3, noise=0.6):
    radius = jnp.linspace(0.05, 1.0, per_class)
    points, labels = [], []
    for c in range(classes):
        key, sub = jax.random.split(key)
        start = 2 * jnp.pi * c / classes
        angle = jnp.linspace(start, start + 4.0, per_class)
        angle = angle + noise * jax.random.normal(sub, (per_class,))
        points.append(jnp.stack([radius * jnp.sin(angle), radius * jnp.cos(angle)], axis=1))
        labels.append(jnp.full(per_class, c))
    return jnp.concatenate(points), jnp.concatenate(labels)


points, labels = make_spirals(jax.random.key(seed))
order = jax.random.permutation(jax.random.key(seed + 1), len(labels))
train_x, train_y = points[order[:900]], labels[order[:900]]
test_x, test_y = points[order[900:]], labels[order[900:]]


def init_params(key, sizes=(2, 64, 64, 3)):
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "w": jax.random.normal(sub, (fan_in, fan_out)) / jnp.sqrt(fan_in),
            "b": jnp.zeros(fan_out),
        }
    return params


def predict(params, x):
    for i in range(len(params)):
        x = x @ params[f"dense{i}"]["w"] + params[f"dense{i}"]["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(predict(params, x), y).mean()


def accuracy(params, x, y):
    return float(jnp.mean(predict(params, x).argmax(-1) == y))


plt.figure(figsize=(4, 4))
plt.scatter(*train_x.T, c=train_y, s=6, cmap="viridis")
plt.title("Training set")
plt.axis("equal")
plt.show()

# %% [markdown]
# ## `swats_local` inside an `optax.chain`
#
# SWATS returns the final updates (each phase has its own rate), so it goes last in the
# chain, here after gradient clipping. The training loop is one `lax.scan` over the steps:
# the switch happens inside the compiled step, with no host round trip.


# %%
def train(optimizer, steps=steps, batch=64, seed=seed, record=None):
    """Trains with minibatches; returns the parameters, the final state and the losses
    (and, given `record`, what `record(state)` returned after each step, stacked)."""
    params = init_params(jax.random.key(seed))

    def step(carry, key):
        params, state = carry
        index = jax.random.choice(key, len(train_y), (batch,), replace=False)
        loss, grads = jax.value_and_grad(loss_fn)(params, train_x[index], train_y[index])
        updates, state = optimizer.update(grads, state, params)
        recorded = None if record is None else record(state)
        return (optax.apply_updates(params, updates), state), (loss, recorded)

    keys = jax.random.split(jax.random.key(seed + 2), steps)
    run = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys))
    (params, state), (losses, recorded) = run((params, optimizer.init(params)), keys)
    if record is None:
        return params, state, np.asarray(losses)
    return params, state, np.asarray(losses), jax.device_get(recorded)


def smooth(losses, window=50):
    return np.convolve(losses, np.ones(window) / window, mode="valid")


def chained(swats):
    return optax.chain(optax.clip_by_global_norm(1.0), swats)


local_tol = 1e-4
local_run = train(chained(swats_jax.swats_local(learning_rate, switch_tol=local_tol)))
local_params, local_state, local_losses = local_run
print(
    f"swats_local: test accuracy {accuracy(local_params, test_x, test_y):.3f}, "
    f"{swats_jax.num_switched(local_state)} of 6 arrays in SGD"
)

# %% [markdown]
# ## The switch events
#
# `switch_events` reads the switch points back from the state (of the chain here): the
# layer, the step whose test passed (SGD starts on the next one) and the adopted SGD
# rate. `format_switch_table` writes the per-layer table of the SWATS papers.

# %%
events = swats_jax.switch_events(local_state)
display(Markdown(swats_jax.format_switch_table(events)))

plt.figure(figsize=(7, 3.5))
plt.plot(smooth(local_losses), label="swats_local (50-step mean)")
for event in events:
    plt.axvline(event.step, color="gray", linestyle=":", linewidth=1)
    plt.text(event.step, plt.ylim()[1], event.path, rotation=90, va="top", fontsize=8)
plt.xlabel("step")
plt.ylabel("training loss")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# ## The switch tolerance
#
# A leaf switches when its running rate estimate Λ and the current projection γ agree to
# within `switch_tol` (absolute). The local study used 1e-5 on CIFAR-10; the paper's 1e-9
# rarely fires. Larger tolerances switch more arrays, and earlier.

# %%
tolerances = [1e-3, 1e-4, 1e-5, 1e-6]
sweep = {}
for tol in tolerances:
    if tol == local_tol:  # trained above
        params, state, losses = local_run
    else:
        params, state, losses = train(chained(swats_jax.swats_local(learning_rate, switch_tol=tol)))
    sweep[tol] = (swats_jax.switch_events(state), accuracy(params, test_x, test_y), losses)

figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
leaves = sorted({e.path for events, _, _ in sweep.values() for e in events})
for tol in tolerances:
    events, test_accuracy, losses = sweep[tol]
    print(
        f"switch_tol={tol:g}: {len(events)} of 6 arrays switched, test accuracy {test_accuracy:.3f}"
    )
    left.scatter(
        [e.step for e in events],
        [leaves.index(e.path) for e in events],
        marker="o",
        s=40,
        label=f"{tol:g}",
        alpha=0.8,
    )
    right.plot(smooth(losses), label=f"switch_tol={tol:g}")
left.set_yticks(range(len(leaves)), leaves)
left.set_xlim(0, steps)
left.set_xlabel("step of the switch")
left.set_title("When each array switched")
left.legend(title="switch_tol")
right.set_yscale("log")
right.set_xlabel("step")
right.set_ylabel("training loss (50-step mean)")
right.legend()
plt.show()

# %% [markdown]
# ## How far each array is from switching
#
# On every Adam step each array compares its running rate estimate Λ with the step's
# projected rate γ. `switch_diagnostics` reads from the state the Λ and γ of each array's
# last test and their gap; a `swats_local` array switches once `absolute_gap < switch_tol`
# (and Λ > 0). After the `switch_tol=1e-4` run above (a switched array shows its switch
# step's test):

# %%
diagnostics = swats_jax.switch_diagnostics(local_state)
display(
    Markdown(
        "| array | phase | switch step | Λ | γ | absolute gap | relative gap |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        + "".join(
            f"| `{d.path}` | {d.phase} | {d.switch_step or ''} | {d.estimate:.4g} | "
            f"{d.gamma:.4g} | {d.absolute_gap:.2e} | {d.relative_gap:.2e} |\n"
            for d in diagnostics
        )
    )
)

# %% [markdown]
# To follow the gaps step by step, train once with `switch_tol=0` (the test runs on every
# step but never passes: Adam all along) and record the state after each step without its
# parameter-sized buffers (a few numbers per array), then read every step with
# `switch_diagnostics`. The gap of one minibatch's step is noisy (blue); what decides the
# switch is the first step whose gap falls below the tolerance (with Λ > 0, after step 1),
# that is where the smallest gap so far (red) crosses the tolerance's line.


# %%
def scalars_only(state):
    """The state without its parameter-sized buffers, what switch_diagnostics reads: the
    per-leaf vectors, and the first moments' structure and dtypes (one scalar per leaf)
    that name the leaves."""
    is_swats = lambda x: isinstance(x, swats_jax.SwatsState)  # noqa: E731

    def drop(s):
        if not is_swats(s):
            return s
        names = jax.tree.map(lambda m: jnp.zeros((), m.dtype), s.mu)
        return s._replace(mu=names, nu=None, nu_max=None)

    return jax.tree.map(drop, state, is_leaf=is_swats)


def at_step(recorded, t):
    """The recorded state after step t + 1."""
    return jax.tree.map(lambda x: x[t], recorded)


never = chained(swats_jax.swats_local(learning_rate, switch_tol=0.0))
*_, recorded = train(never, record=scalars_only)
history = [swats_jax.switch_diagnostics(at_step(recorded, t)) for t in range(steps)]
arrays = [d.path for d in history[0]]
gaps = np.array([[d.absolute_gap for d in row] for row in history])  # [step, array]
positive = np.array([[d.estimate > 0 for d in row] for row in history])

# The test can pass where Λ > 0, from step 2 on: its smallest gap so far there is the curve
# that crosses each tolerance on the step that tolerance would switch the array.
testable = np.where(positive, gaps, np.inf)
testable[0] = np.inf
closest = np.minimum.accumulate(testable, axis=0)
step_numbers = np.arange(1, steps + 1)
figure, axes = plt.subplots(2, 3, figsize=(11, 5.5), sharex=True, sharey=True)
for i, (name, ax) in enumerate(zip(arrays, axes.flat)):
    ax.plot(step_numbers[1:], gaps[1:, i], color="C0", alpha=0.3, linewidth=0.5)
    ax.plot(step_numbers, closest[:, i], color="C3", label="smallest so far")
    for tol in tolerances:
        ax.axhline(tol, color="black", linestyle="--", linewidth=0.7)
    ax.set_title(name, fontsize=10)
    ax.set_yscale("log")
for ax in axes[1]:
    ax.set_xlabel("step")
for ax in axes[:, 0]:
    ax.set_ylabel("|Λ - γ|")
axes[0, 0].legend(fontsize=8)
figure.suptitle(
    "Each array's switch test in a run that never switches (dashed: "
    + ", ".join(f"{tol:g}" for tol in tolerances)
    + ")"
)
plt.show()


def first_pass(tol):
    """Per array, the first step whose test passes `tol`, or None: where the red curve
    first falls below the line of `tol`."""
    passes = testable < tol
    return [int(np.argmax(p)) + 1 if p.any() else None for p in passes.T]


# %% [markdown]
# Which tolerance would have switched which array, and when, according to that run; in
# brackets, the step each array switched on in the sweep above. The first array to switch
# does so exactly when predicted (both runs are the same until then); after it, the network
# trains differently, so the later switches drift from the prediction.

# %%
header = "| array | " + " | ".join(f"`switch_tol={tol:g}`" for tol in tolerances) + " |\n"
rows = "|---|" + "---:|" * len(tolerances) + "\n"
predicted = {tol: first_pass(tol) for tol in tolerances}
actual = {tol: {e.path: e.step for e in sweep[tol][0]} for tol in tolerances}
for i, name in enumerate(arrays):
    cells = []
    for tol in tolerances:
        would, did = predicted[tol][i], actual[tol].get(name)
        cells.append(f"{would or '-'} ({did or '-'})")
    rows += f"| `{name}` | " + " | ".join(cells) + " |\n"
display(Markdown(header + rows))
for tol in tolerances:
    count = sum(step is not None for step in predicted[tol])
    print(f"switch_tol={tol:g} would switch {count} of {len(arrays)} arrays within {steps} steps")

# %% [markdown]
# ## Local against global switching
#
# `swats_global` runs the same test on every array but switches the whole network, with
# the first triggering array's rate, as in the paper. Its test is relative
# (`switch_rtol`, plus `switch_atol`); Adam is the baseline. The dotted lines mark the
# switches.

# %%
runs = {
    "adam": train(chained(optax.adam(learning_rate))),
    f"swats_local (switch_tol={local_tol:g})": local_run,  # trained above
    "swats_global (switch_rtol=1e-3)": train(
        chained(swats_jax.swats_global(learning_rate, switch_rtol=1e-3))
    ),
}
plt.figure(figsize=(8, 4))
for (name, (params, state, losses)), colour in zip(runs.items(), ["C0", "C1", "C2"]):
    events = swats_jax.switch_events(state)
    switched = swats_jax.num_switched(state)
    print(
        f"{name}: test accuracy {accuracy(params, test_x, test_y):.3f}, "
        f"{switched} of 6 arrays in SGD, switches at steps {[e.step for e in events]}"
    )
    plt.plot(smooth(losses), color=colour, label=name)
    for event in events:
        plt.axvline(event.step, color=colour, linestyle=":", linewidth=1)
plt.xlabel("step")
plt.ylabel("training loss (50-step mean)")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# On a real network the local variant lets the layers that settle early (the classifier,
# often within the first epoch) move to SGD while the others keep adapting; the
# CIFAR-10 notebook reproduces the published comparison.
