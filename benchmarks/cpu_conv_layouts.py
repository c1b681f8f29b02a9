"""Data layouts and XLA:CPU options for the ResNet-18 training step's convolutions, on CPU.

Run: ``python benchmarks/cpu_conv_layouts.py [--width 32] [--repeats 4]``.

A plain-JAX ResNet-18 (CIFAR layout: a 3x3 stem, four stages of two basic blocks, 1x1
projection shortcuts, BatchNorm in training mode with the two-pass variance, global average
pooling, a linear layer), batch 128, float32: the forward-and-backward time of its
cross-entropy loss, median of ``--repeats`` after one warm-up, for each combination of

- the activations' and kernels' layout: ``NHWC/HWIO`` (the trainer's, Flax's default) or
  ``NCHW/OIHW`` (PyTorch's);
- XLA:CPU's options: the trainer's (``train/xla_cpu.py``) or XLA's defaults
  (``SWATS_JAX_XLA_DEFAULTS=1``);

each in a fresh process (XLA reads its options once per process). The parameters are random;
the model is written here, so that the layout can change without touching the trainer's.
"""

import argparse
import os

import cpu_train_speed  # beside this script

BATCH = 128
LAYOUTS = {"NHWC/HWIO": ("NHWC", "HWIO", "NHWC"), "NCHW/OIHW": ("NCHW", "OIHW", "NCHW")}


def step_ms(layout: str, width: int, repeats: int) -> float:
    """Forward-and-backward time of the plain-JAX ResNet-18 in ``layout``, in this process."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    dimensions = LAYOUTS[layout]
    channels_last = dimensions[0] == "NHWC"
    reduce_axes = (0, 1, 2) if channels_last else (0, 2, 3)
    rng = np.random.default_rng(0)

    def kernel(size, fan_in, fan_out):
        shape = (size, size, fan_in, fan_out) if channels_last else (fan_out, fan_in, size, size)
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(size * size * fan_in), jnp.float32)

    def norm(channels):
        return jnp.ones(channels, jnp.float32), jnp.zeros(channels, jnp.float32)

    params = {"stem": kernel(3, 3, width), "stem_norm": norm(width), "blocks": []}
    features = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        out = width * 2**stage
        for block_stride in (stride, 1):
            block = {
                "conv1": kernel(3, features, out),
                "norm1": norm(out),
                "conv2": kernel(3, out, out),
                "norm2": norm(out),
            }
            if block_stride != 1 or features != out:
                block["shortcut"], block["shortcut_norm"] = kernel(1, features, out), norm(out)
            params["blocks"].append((block_stride, block))
            features = out
    params["linear"] = jnp.asarray(rng.normal(size=(features, 10)) * 0.01, jnp.float32)
    strides = [stride for stride, _ in params["blocks"]]
    params["blocks"] = [block for _, block in params["blocks"]]

    def conv(x, w, stride):
        pad = w.shape[0 if channels_last else 2] // 2
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=dimensions
        )

    def batch_norm(x, scale_bias):
        scale, bias = scale_bias
        shape = [1, 1, 1, -1] if channels_last else [1, -1, 1, 1]
        mean = jnp.mean(x, reduce_axes, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), reduce_axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * scale.reshape(shape) + bias.reshape(
            shape
        )

    def loss(params, images, labels):
        x = jax.nn.relu(batch_norm(conv(images, params["stem"], 1), params["stem_norm"]))
        for stride, block in zip(strides, params["blocks"]):
            y = jax.nn.relu(batch_norm(conv(x, block["conv1"], stride), block["norm1"]))
            y = batch_norm(conv(y, block["conv2"], 1), block["norm2"])
            if "shortcut" in block:
                x = batch_norm(conv(x, block["shortcut"], stride), block["shortcut_norm"])
            x = jax.nn.relu(x + y)
        logits = jnp.mean(x, reduce_axes[1:]) @ params["linear"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels])

    image_shape = (BATCH, 32, 32, 3) if channels_last else (BATCH, 3, 32, 32)
    images = jnp.asarray(rng.normal(size=image_shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, BATCH))
    gradient = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(gradient(params, images, labels))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(gradient(params, images, labels))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _in_a_fresh_process(layout: str, width: int, repeats: int, defaults: bool) -> float:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from train import xla_cpu; "
        "xla_cpu.tune(); import cpu_conv_layouts as b; "
        f"print(json.dumps(b.step_ms({layout!r}, {width}, {repeats})))"
    )
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ["SWATS_JAX_XLA_DEFAULTS"] = "1" if defaults else "0"
    return cpu_train_speed.json_from_a_fresh_process(code, environ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    import jax

    print(
        f"# plain-JAX ResNet-18 width {args.width}, batch {BATCH}, float32, forward and "
        f"backward, median of {args.repeats}; jax {jax.__version__}; {os.cpu_count()} cores"
    )
    print("| layout | trainer's XLA:CPU options, ms | XLA defaults, ms |")
    print("|---|---:|---:|")
    for layout in LAYOUTS:
        tuned, default = (
            _in_a_fresh_process(layout, args.width, args.repeats, defaults)
            for defaults in (False, True)
        )
        print(f"| {layout} | {tuned:.0f} | {default:.0f} |", flush=True)


if __name__ == "__main__":
    main()
