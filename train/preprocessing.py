"""On-device image preprocessing, run inside the jitted training and evaluation steps.

``augment`` (random crop with zero padding 4 and horizontal flip, then normalisation)
for training, ``preprocess_eval`` (normalisation only) for evaluation. ``augment`` is
``random_crops`` (the draws) applied by ``crop_and_flip``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-channel statistics of the official training set, pixels scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Random crop after zero padding and random horizontal flip, then normalisation.

    As torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``: the
    padding is black in pixel space, before normalisation. Every image gets its own
    offset and flip (``random_crops``, applied by ``crop_and_flip``); jit-compatible.

    Args:
      key: PRNG key.
      images: uint8 [B, H, W, C].
      padding: pixels of zeros added on each side before cropping back to H x W.

    Returns:
      float32 [B, H, W, C], normalised with ``MEAN`` and ``STD``.
    """
    offsets, flips = random_crops(key, images.shape[0], padding=padding)
    return preprocess_eval(crop_and_flip(images, offsets, flips, padding=padding))


def random_crops(key: jax.Array, batch: int, *, padding: int = 4) -> tuple[jax.Array, jax.Array]:
    """Per image, the crop's (top, left) offset into the padded image, uniform on
    ``0 ... 2 * padding`` each, and whether to flip it (probability 1/2).

    Returns:
      int32 offsets [batch, 2] and bool flips [batch].
    """
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    return offsets, flips


def crop_and_flip(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int = 4
) -> jax.Array:
    """Pads ``images`` [B, H, W, C] with ``padding`` zeros on each side, crops each back to
    H x W at its (top, left) ``offsets`` [B, 2], then mirrors left-right where ``flips`` [B]."""
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def preprocess_eval(images: jax.Array) -> jax.Array:
    """Scales uint8 images [..., 3] to [0, 1] and normalises them with ``MEAN`` and ``STD``."""
    images = jnp.asarray(images, jnp.float32) / 255
    shape = (1,) * (images.ndim - 1) + (3,)
    mean = jnp.reshape(jnp.asarray(MEAN, jnp.float32), shape)
    std = jnp.reshape(jnp.asarray(STD, jnp.float32), shape)
    return (images - mean) / std
