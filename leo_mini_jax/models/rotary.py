"""Rotary position embeddings (RoPE) as HF LLaMA computes them, with Llama-3 scaling.

Positions are given per token ([B, T]): packed rows restart them at every example.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 frequency-dependent rope scaling (HF rope_type 'llama3')."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


def inverse_frequencies(dim: int, theta: float, scaling: RopeScaling | None) -> Array:
  """inv_freq [dim // 2] as HF computes it, with Llama-3 scaling when given."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if scaling is None:
    return inv_freq
  old_context = scaling.original_max_position_embeddings
  low_freq_wavelen = old_context / scaling.low_freq_factor
  high_freq_wavelen = old_context / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rotary(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotate-half rotary embedding.

  Args:
    x: [B, T, H, Dh].
    positions: [B, T] integer positions.
    inv_freq: [Dh // 2].
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
