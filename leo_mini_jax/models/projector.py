"""Visual projector: Linear → GELU → Linear with hidden width d_LLM (paper §4.1)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import layers


class Projector(nn.Module):
  """[B, N^V, Σ d_i] → [B, N^V, d_LLM]."""
  llm_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visual_tokens: jax.Array) -> jax.Array:
    dense = lambda axes, name: layers.dense(self.llm_dim, axes, name, self.dtype,
                                            self.param_dtype)
    hidden = dense(("projector_in", "projector_hidden"), "fc1")(visual_tokens)
    # Exact (erf) GELU, as torch nn.GELU() in LLaVA/EAGLE projectors.
    hidden = nn.gelu(hidden, approximate=False)
    out = dense(("projector_hidden", "embed"), "fc2")(hidden)
    return nn.with_logical_constraint(
        out, ("activation_batch", "activation_vision_tokens", "activation_embed"))
