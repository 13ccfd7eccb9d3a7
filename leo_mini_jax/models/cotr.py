"""CoTR: conditional token reduction (paper §3.2, Eq. 2–7; DESIGN.md §2.2).

For each vision expert i, with learnable queries Q_i [N^V, d_i] and expert tokens
I_i [N_i, d_i], scores live in a common space of width c = `cotr_dim`:

    Q̂_i = Q_i W^Q_i,  Î_j = I_j W^I_j (every expert j),  T̂ = T W^T      (projections)
    s_query = Q̂_i Î_iᵀ                                  [N^V, N_i]     (Eq. 2)
    s_self  = pool(Î_i) Î_iᵀ                             [1,   N_i]     (Eq. 3)
    s_cross = Σ_{j≠i} pool(Î_j) Î_iᵀ                     [1,   N_i]     (Eq. 4)
    s_text  = pool(T̂) Î_iᵀ                               [1,   N_i]     (Eq. 5)
    α_i = softmax_{N_i}((s_query + s_self + s_cross + s_text) / √c)     (Eq. 6)
    Ī_i = α_i I_i                                        [N^V, d_i]     (Eq. 7)

and the Ī_i are concatenated on channels → [N^V, Σ d_i].

Choices (DESIGN.md §2.2): the √c scale sits inside the softmax so rows sum to one;
`pool` is a masked mean by default ('sum' gives the paper's literal vector of ones);
values are the expert's own features, so Ī_i keeps width d_i and the projector trained in
stages 1–2 still fits; T is the instruction (user-turn) tokens only.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import layers

Array = jax.Array
POOLS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class CoTRConfig:
  num_visual_tokens: int = 64  # N^V
  cotr_dim: int = 256  # c, width of the common scoring space
  pool: str = "mean"

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"reducer.pool={self.pool!r}: expected one of {POOLS}")
    if self.num_visual_tokens < 1:
      raise ValueError(f"reducer.num_visual_tokens={self.num_visual_tokens} must be >= 1")


def masked_pool(tokens: Array, mask: Array | None, pool: str) -> Array:
  """Pools [B, N, C] over N → [B, C]; mask [B, N] selects tokens (None = all).

  An empty mask pools to zeros (e.g. a caption example with no instruction).
  """
  if mask is None:
    total = jnp.sum(tokens, axis=1)
    count = jnp.asarray(tokens.shape[1], tokens.dtype)
  else:
    weights = mask.astype(tokens.dtype)[..., None]
    total = jnp.sum(tokens * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return total / count if pool == "mean" else total


class CoTR(nn.Module):
  """Reduces every expert's tokens to N^V, conditioned on the other experts and the text."""
  config: CoTRConfig
  expert_names: tuple[str, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array], text_embeds: Array,
               text_mask: Array) -> Array:
    """Consolidates visual tokens.

    Args:
      features: per expert, I_i [B, N_i, d_i].
      text_embeds: T [B, L, d_text], the LLM's input embeddings of the prompt.
      text_mask: [B, L] 1 on instruction (user-turn) tokens.

    Returns:
      [B, N^V, Σ d_i].
    """
    cfg = self.config
    if len(features) != len(self.expert_names):
      raise ValueError(f"CoTR got {len(features)} feature maps for experts "
                       f"{self.expert_names}")
    dense = lambda axes, name: layers.dense(cfg.cotr_dim, axes, name, self.dtype,
                                            self.param_dtype)
    scale = cfg.cotr_dim ** -0.5

    visual_hat = [dense(("vision_embed", "cotr"), f"{name}_visual_proj")(feats)
                  for name, feats in zip(self.expert_names, features)]  # Î_j [B, N_j, c]
    pooled_visual = [masked_pool(v, None, cfg.pool) for v in visual_hat]  # [B, c]
    pooled_all = sum(pooled_visual)
    text_hat = dense(("embed", "cotr"), "text_proj")(text_embeds)  # T̂ [B, L, c]
    pooled_text = masked_pool(text_hat, text_mask, cfg.pool)  # [B, c]

    consolidated = []
    for name, feats, v_hat, pooled_self in zip(self.expert_names, features, visual_hat,
                                               pooled_visual):
      queries = layers.learned_queries(self, f"{name}_queries", cfg.num_visual_tokens,
                                       feats.shape[-1], self.param_dtype)
      q_hat = dense(("vision_embed", "cotr"), f"{name}_query_proj")(
          jnp.asarray(queries, self.dtype))  # Q̂_i [N^V, c]
      s_query = jnp.einsum("qc,bnc->bqn", q_hat, v_hat)
      s_self = jnp.einsum("bc,bnc->bn", pooled_self, v_hat)
      s_cross = jnp.einsum("bc,bnc->bn", pooled_all - pooled_self, v_hat)
      s_text = jnp.einsum("bc,bnc->bn", pooled_text, v_hat)
      scores = s_query + (s_self + s_cross + s_text)[:, None, :]
      alpha = jax.nn.softmax(scores.astype(jnp.float32) * scale, axis=-1)
      consolidated.append(jnp.einsum("bqn,bnd->bqd", alpha.astype(self.dtype),
                                     feats.astype(self.dtype)))
    out = jnp.concatenate(consolidated, axis=-1)
    return nn.with_logical_constraint(
        out, ("activation_batch", "activation_vision_tokens", "activation_vision_embed"))
