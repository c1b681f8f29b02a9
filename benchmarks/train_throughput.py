"""Training throughput of the trainer, against a bare JAX/Flax step, in one process.

Run (GPU, real data): ``python benchmarks/train_throughput.py --data PATH/cifar10-jpeg.tar.xz``.

For each optimizer and compute dtype it runs ``train.trainer.train_and_evaluate`` for
``--epochs`` epochs of ResNet-18 and reports the images/s of the last epoch, and the seconds
of the first epoch, which include compiling the training chunk and the evaluation (an upper
bound on the time from the start of training to its first step). The baseline, in the
same process, is a bare step: the same model and ``optax.adam``, the dataset on the device, a
shuffled batch gathered on the device, no augmentation, forward, backward and update, the
steps of an epoch inside one ``lax.scan``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import data as data_lib
from train.config import Config
from train.trainer import init_model, train_and_evaluate


def bare_step_throughput(config: Config, dataset: data_lib.Dataset, epochs: int) -> float:
    """Images/s of the last of ``epochs`` epochs of a bare scan-of-steps with optax.adam."""
    model, params, stats = init_model(config, dataset.num_classes)
    optimizer = optax.adam(1e-3)
    images = jax.device_put(data_lib.preprocess_eval(jnp.asarray(dataset.train_images)))
    labels = jax.device_put(jnp.asarray(dataset.train_labels))
    steps = len(labels) // config.batch_size

    def loss_fn(params, stats, x, y):
        net = model.merge(params, stats)
        net.train()
        logits = net(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))

    def step(carry, idx):
        params, stats, opt_state = carry
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, images[idx], labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), None

    @jax.jit
    def epoch(carry, key):
        order = jax.random.permutation(key, len(labels))[: steps * config.batch_size]
        carry, _ = jax.lax.scan(step, carry, order.reshape(steps, config.batch_size))
        return carry

    carry = (params, stats, optimizer.init(params))
    for e in range(epochs):
        start = time.perf_counter()
        carry = jax.block_until_ready(epoch(carry, jax.random.key(e)))
        seconds = time.perf_counter() - start
    return steps * config.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--opts", default="swats_local,swats_global,adabound,adam")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--width", type=int, default=None, help="smaller model (CPU checks)")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=(1024, 256))
    parser.add_argument("--chunk-steps", type=int, default=400)
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = data_lib.load_cifar10(args.data, synthetic_size=tuple(args.synthetic_size), workers=8)
    print(
        f"# data: {args.data}, {len(dataset.train_labels)} train images, "
        f"loaded in {time.perf_counter() - start:.1f} s"
    )
    device = jax.devices()[0]
    print(
        f"# {device.platform}: {device.device_kind} x{jax.device_count()}; "
        f"{platform.machine()}; jax {jax.__version__}, optax {optax.__version__}; "
        f"ResNet-18 width {args.width or 64}, batch 128, epoch {args.epochs} of {args.epochs}"
    )
    print("| run | dtype | images/s | vs bare adam step | epoch 1 s, compile included | test acc |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        base = Config(
            model="resnet18",
            dtype=dtype,
            width=args.width,
            chunk_steps=args.chunk_steps,
            epochs=args.epochs,
        )
        bare = bare_step_throughput(base, dataset, args.epochs)
        print(f"| bare step, optax.adam | {dtype} | {bare:,.0f} | 1.00x | - | - |", flush=True)
        for opt in args.opts.split(","):
            config = Config(**{**base.to_json(), "opt": opt, "synthetic_size": (1, 1)})
            with tempfile.TemporaryDirectory() as workdir:
                records = train_and_evaluate(config, workdir, dataset=dataset)
            last = records[-1]
            rate = last["images_per_s"]  # None when only compiling steps ran
            print(
                f"| trainer, {opt} | {dtype} | {'-' if rate is None else f'{rate:,.0f}'} | "
                f"{'-' if rate is None else f'{rate / bare:.2f}x'} | "
                f"{records[0]['epoch_time_s']:.1f} | "
                f"{100 * last['test_accuracy']:.2f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
