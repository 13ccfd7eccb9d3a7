"""Noise parameters for a vision tower's tests: no all-ones / all-zeros leaf hides a bug."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def noise_params(tower: nn.Module, pixels: jax.Array, seed: int = 0,
                 scale: float = 0.3) -> dict:
  """The tower's parameter tree, every leaf noise around 0 (around 1 for norm scales).

  Only the shapes come from `tower.init`, traced (jax.eval_shape), never run: an eager
  init of a scanned tower costs tens of seconds on a CPU.
  """
  shapes = nn.meta.unbox(jax.eval_shape(tower.init, jax.random.key(seed), pixels)["params"])
  rng = np.random.default_rng(seed)

  def noise(path, leaf):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(noise, shapes)
