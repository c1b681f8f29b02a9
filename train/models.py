"""CIFAR-10 ResNet and DenseNet in Flax NNX, ported from kuangliu/pytorch-cifar.

These are the models the SWATS reference code trains. Shapes, padding, layer names
and initialisation follow the PyTorch originals, so the parameter at
``layer1/0/conv1/kernel`` here is ``layer1.0.conv1.weight`` there (kernels are
HWIO instead of OIHW, and images are NHWC).

Initialisation is PyTorch's default: conv and linear weights and the linear bias
are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm starts at scale 1,
bias 0 and uses PyTorch's momentum 0.1 (Flax ``momentum=0.9``) and eps 1e-5, and its
running variance follows PyTorch's: it is updated with the unbiased batch variance
(``BatchNorm`` below), where Flax's uses the biased one.

``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm
statistics stay float32 and the logits are returned in float32 (float64 when computing
in float64).

Switch BatchNorm between batch and running statistics with ``model.train()`` and
``model.eval()``, or get an evaluation view sharing the same arrays with
``nnx.view(model, use_running_average=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

# kaiming_uniform(a=sqrt(5)), PyTorch's default for Conv2d and Linear weights.
_torch_weight_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nnx.Initializer:
    bound = 1 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dtype: DTypeLike,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    # Symmetric padding as in PyTorch; Flax's "SAME" pads only the far side at stride 2.
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=kernel_size // 2,
        use_bias=False,
        kernel_init=_torch_weight_init,
        dtype=dtype,
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """Flax's BatchNorm whose running variance is updated as PyTorch's is.

    In training mode the output is Flax's (normalised with the biased batch variance, as
    PyTorch does too), and the running mean is Flax's; the running variance moves towards
    the unbiased batch variance, ``n / (n - 1)`` times the biased one, ``n`` being the
    number of values per channel (batch x height x width; with n = 1, where PyTorch
    raises, the biased one). Masks are not supported.
    """

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: None = None
    ) -> jax.Array:
        if mask is not None:
            raise NotImplementedError("BatchNorm with a mask")
        if use_running_average is None:
            use_running_average = self.use_running_average
        previous = self.var[...]
        y = super().__call__(x, use_running_average)
        if not use_running_average:
            axes = tuple(range(x.ndim - 1))
            stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
            x = jnp.asarray(x, stats_dtype)
            # The same two-pass variance as Flax's (use_fast_variance=False).
            variance = jnp.mean(jnp.square(x - jnp.mean(x, axes, keepdims=True)), axes)
            n = math.prod(x.shape[:-1])
            unbiased = variance * (n / max(n - 1, 1))
            self.var[...] = jax.lax.stop_gradient(
                self.momentum * previous + (1 - self.momentum) * unbiased
            ).astype(previous.dtype)
        return y


def _batch_norm(num_features: int, *, dtype: DTypeLike, rngs: nnx.Rngs) -> BatchNorm:
    # Two-pass variance, as PyTorch computes it: E[x^2] - E[x]^2 cancels catastrophically
    # in float32 when a channel's mean is large next to its spread.
    return BatchNorm(
        num_features,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        rngs=rngs,
    )


def _linear(in_features: int, out_features: int, *, dtype: DTypeLike, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=_torch_weight_init,
        bias_init=_torch_bias_init(in_features),
        dtype=dtype,
        rngs=rngs,
    )


def _logits(x: jax.Array) -> jax.Array:
    """Logits in float32 at least: a bfloat16 model's are widened, a float64 one's kept."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Projection(nnx.Module):
    """1x1 conv + BatchNorm shortcut used when a residual block changes shape."""

    def __init__(
        self, in_features: int, out_features: int, stride: int, *, dtype: DTypeLike, rngs: nnx.Rngs
    ):
        self.conv = _conv(in_features, out_features, 1, stride=stride, dtype=dtype, rngs=rngs)
        self.bn = _batch_norm(out_features, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet-18/34 block)."""

    def __init__(
        self, in_features: int, out_features: int, stride: int, *, dtype: DTypeLike, rngs: nnx.Rngs
    ):
        self.conv1 = _conv(in_features, out_features, 3, stride=stride, dtype=dtype, rngs=rngs)
        self.bn1 = _batch_norm(out_features, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(out_features, out_features, 3, dtype=dtype, rngs=rngs)
        self.bn2 = _batch_norm(out_features, dtype=dtype, rngs=rngs)
        self.shortcut = (
            Projection(in_features, out_features, stride, dtype=dtype, rngs=rngs)
            if stride != 1 or in_features != out_features
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nnx.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """CIFAR ResNet: 3x3 stem without max-pool, stages of BasicBlocks, global average pool.

    Stage ``i`` (1-based) is the attribute ``layer{i}``, a list of blocks; its first
    block has stride 1 for the first stage and 2 after.

    Args:
      block_sizes: number of blocks per stage.
      widths: output channels per stage; the stem has ``widths[0]`` channels.
      num_classes: size of the output layer.
      dtype: compute dtype; parameters stay float32.
      rngs: random number generators for initialisation.
    """

    def __init__(
        self,
        block_sizes: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        *,
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv1 = _conv(3, widths[0], 3, dtype=dtype, rngs=rngs)
        self.bn1 = _batch_norm(widths[0], dtype=dtype, rngs=rngs)
        self.num_stages = len(block_sizes)
        features = widths[0]
        for stage, (size, width) in enumerate(zip(block_sizes, widths, strict=True)):
            blocks = []
            for index in range(size):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(features, width, stride, dtype=dtype, rngs=rngs))
                features = width
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.linear = _linear(features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images [B, 32, 32, 3] to float32 logits [B, num_classes]."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{stage}"):
                x = block(x)
        # kuangliu's 4x4 average pool covers the whole 4x4 map of a 32x32 input.
        x = jnp.mean(x, axis=(1, 2))
        return _logits(self.linear(x))


def ResNet18(
    num_classes: int = 10, width: int = 64, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32
) -> ResNet:
    """ResNet-18 for CIFAR: 11,173,962 parameters at ``width=64`` and 10 classes.

    ``width`` scales the stage widths (64, 128, 256, 512); smaller values give tiny
    test models.
    """
    return ResNet(
        (2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width), num_classes, dtype=dtype, rngs=rngs
    )


class Bottleneck(nnx.Module):
    """DenseNet layer: BN-ReLU-1x1 conv to 4*growth, BN-ReLU-3x3 conv to growth, concat."""

    def __init__(self, in_features: int, growth_rate: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.bn1 = _batch_norm(in_features, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(in_features, 4 * growth_rate, 1, dtype=dtype, rngs=rngs)
        self.bn2 = _batch_norm(4 * growth_rate, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(4 * growth_rate, growth_rate, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv1(nnx.relu(self.bn1(x)))
        out = self.conv2(nnx.relu(self.bn2(out)))
        # New features first, as in the reference (torch.cat([out, x], 1)).
        return jnp.concatenate([out, x], axis=-1)


class Transition(nnx.Module):
    """DenseNet transition: BN-ReLU-1x1 conv, then 2x2 average pool."""

    def __init__(self, in_features: int, out_features: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.bn = _batch_norm(in_features, dtype=dtype, rngs=rngs)
        self.conv = _conv(in_features, out_features, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(nnx.relu(self.bn(x)))
        return nnx.avg_pool(out, (2, 2), strides=(2, 2))


class DenseNet(nnx.Module):
    """CIFAR DenseNet-BC: 3x3 stem to 2*growth channels, dense blocks and transitions.

    Dense block ``i`` (1-based) is the attribute ``dense{i}``, a list of
    ``Bottleneck`` layers; ``trans{i}`` follows every block but the last.

    Args:
      block_sizes: number of bottleneck layers per dense block.
      growth_rate: channels each bottleneck adds.
      num_classes: size of the output layer.
      reduction: channel compression of the transitions.
      dtype: compute dtype; parameters stay float32.
      rngs: random number generators for initialisation.
    """

    def __init__(
        self,
        block_sizes: Sequence[int],
        growth_rate: int,
        num_classes: int = 10,
        *,
        reduction: float = 0.5,
        dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        features = 2 * growth_rate
        self.conv1 = _conv(3, features, 3, dtype=dtype, rngs=rngs)
        self.num_stages = len(block_sizes)
        for stage, size in enumerate(block_sizes, start=1):
            layers = []
            for _ in range(size):
                layers.append(Bottleneck(features, growth_rate, dtype=dtype, rngs=rngs))
                features += growth_rate
            setattr(self, f"dense{stage}", nnx.List(layers))
            if stage < self.num_stages:
                out_features = math.floor(features * reduction)
                setattr(
                    self,
                    f"trans{stage}",
                    Transition(features, out_features, dtype=dtype, rngs=rngs),
                )
                features = out_features
        self.bn = _batch_norm(features, dtype=dtype, rngs=rngs)
        self.linear = _linear(features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images [B, 32, 32, 3] to float32 logits [B, num_classes]."""
        x = self.conv1(x)
        for stage in range(1, self.num_stages + 1):
            for layer in getattr(self, f"dense{stage}"):
                x = layer(x)
            if stage < self.num_stages:
                x = getattr(self, f"trans{stage}")(x)
        x = jnp.mean(nnx.relu(self.bn(x)), axis=(1, 2))
        return _logits(self.linear(x))


def DenseNet121(
    num_classes: int = 10,
    growth_rate: int = 32,
    *,
    rngs: nnx.Rngs,
    dtype: DTypeLike = jnp.float32,
) -> DenseNet:
    """DenseNet-121 for CIFAR: 6,956,298 parameters at ``growth_rate=32`` and 10 classes."""
    return DenseNet((6, 12, 24, 16), growth_rate, num_classes, dtype=dtype, rngs=rngs)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    width: int | None = None,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
) -> ResNet | DenseNet:
    """Builds a preset by name.

    Args:
      name: ``"resnet18"`` or ``"densenet121"`` (case-insensitive).
      num_classes: size of the output layer.
      width: ResNet-18 base width or DenseNet-121 growth rate; ``None`` for the
        published size (64 and 32).
      dtype: compute dtype; parameters stay float32.
      rngs: random number generators for initialisation.

    Raises:
      ValueError: for an unknown name.
    """
    presets = {"resnet18": (ResNet18, 64), "densenet121": (DenseNet121, 32)}
    key = name.lower()
    if key not in presets:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(presets)}")
    factory, default_width = presets[key]
    return factory(num_classes, default_width if width is None else width, rngs=rngs, dtype=dtype)
