"""CoTR: conditional token reduction (paper §3.2, Eq. 2–7; docs/design.md §2.2).

For each vision expert i, with learnable queries Q_i [N^V, d_i] and expert tokens
I_i [N_i, d_i], scores live in a common space of width c = `cotr_dim`:

    Q̂_i = N(Q_i W^Q_i), Î_j = N(I_j W^I_j) (every expert j), T̂ = N(T W^T) (projections)
    s_query = Q̂_i Î_iᵀ                                  [N^V, N_i]     (Eq. 2)
    s_self  = pool(Î_i) Î_iᵀ                             [1,   N_i]     (Eq. 3)
    s_cross = Σ_{j≠i} pool(Î_j) Î_iᵀ                     [1,   N_i]     (Eq. 4)
    s_text  = pool(T̂) Î_iᵀ                               [1,   N_i]     (Eq. 5)
    α_i = softmax_{N_i}((s_query + s_self + s_cross + s_text) / √c)     (Eq. 6)
    Ī_i = α_i I_i                                        [N^V, d_i]     (Eq. 7)

and the Ī_i are concatenated on channels → [N^V, Σ d_i].

Choices (docs/design.md §2.2): the √c scale sits inside the softmax so rows sum to one;
`pool` is a masked mean by default ('sum' gives the paper's literal vector of ones);
values are the expert's own features, so Ī_i keeps width d_i and the projector trained in
stages 1–2 still fits; T is the instruction tokens only (the first user turn by default,
see data/conversation.py).

Initialisation. Only s_query differs between the N^V rows of α; the other terms are
shared by every query. With queries at std 0.02 on unnormalised expert features the
shared terms are orders of magnitude larger and every reduced token starts as the same
average (rows of α differed by ~1e-4 or less). So the queries start at unit scale and
every projected input goes through N, an RMS norm with a learnable per-channel scale
(init 1): each score term is then a dot product of unit-RMS vectors, the query term is
as large as the shared ones from step 0 whatever the experts' feature scales, and the
rows of α differ at init.

Both are switchable for the paper-literal ablation: `score_norm='none'` scores the raw
projections (Q W^Q, I W^I, T W^T, exactly Eq. 2–5) and `query_init_std=0.02` starts the
queries at the usual learned-embedding scale; the defaults ('rms', 1.0) are the above.

Precision: the score products accumulate in float32 (`preferred_element_type`) and the
softmax runs in float32 under bf16 compute; masked means sum and count in float32 and
divide by the exact count.
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import layers

Array = jax.Array
POOLS = ("mean", "sum")
SCORE_NORMS = ("rms", "none")


@dataclasses.dataclass(frozen=True)
class CoTRConfig:
  num_visual_tokens: int = 64  # N^V
  cotr_dim: int = 256  # c, width of the common scoring space
  pool: str = "mean"
  score_norm: str = "rms"  # 'rms': N = RMS norm of the projections; 'none': Eq. 2–5 as printed
  query_init_std: float = 1.0  # std of Q_i at init (0.02 = the paper-literal variant)

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"reducer.pool={self.pool!r}: expected one of {POOLS}")
    if self.score_norm not in SCORE_NORMS:
      raise ValueError(f"reducer.score_norm={self.score_norm!r}: expected one of "
                       f"{SCORE_NORMS}")
    if not self.query_init_std > 0:
      raise ValueError(f"reducer.query_init_std={self.query_init_std} must be > 0")
    if self.num_visual_tokens < 1:
      raise ValueError(f"reducer.num_visual_tokens={self.num_visual_tokens} must be >= 1")


def masked_pool(tokens: Array, mask: Array | None, pool: str) -> Array:
  """Pools [B, N, C] over N → [B, C]; mask [B, N] selects tokens (None = all).

  Sums and counts are float32 (a bf16 count is not exact past 256 tokens) and the mean
  divides by the exact count; an empty mask pools to zeros (e.g. a caption example with
  no instruction): its total is 0, and the count is clamped to 1 only then. Returns
  float32.
  """
  tokens = tokens.astype(jnp.float32)
  if mask is None:
    total = jnp.sum(tokens, axis=1)
    count = jnp.asarray(tokens.shape[1], jnp.float32)
  else:
    weights = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(tokens * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return total / count if pool == "mean" else total


def pool_text_per_image(text_hat: Array, text_mask: Array, pool: str) -> Array:
  """Pools T̂ [B, L, c] for each image → [B·K, c] (float32).

  text_mask: [B, L] (one image per row) or [B, K, L] (packed rows: image k's own
  example's instruction tokens), so T̂ is projected once per row, not once per image.
  """
  if text_mask.ndim == 2:
    return masked_pool(text_hat, text_mask, pool)
  weights = text_mask.astype(jnp.float32)
  total = jnp.einsum("bkl,blc->bkc", weights, text_hat.astype(jnp.float32))
  count = jnp.maximum(jnp.sum(weights, axis=-1), 1.0)[..., None]
  pooled = total / count if pool == "mean" else total
  return pooled.reshape((-1, pooled.shape[-1]))


class CoTR(layers.PerExpertModule):
  """Reduces every expert's tokens to N^V, conditioned on the other experts and the text.

  `config` is a CoTRConfig.
  """

  @nn.compact
  def __call__(self, features: Sequence[Array], text_embeds: Array,
               text_mask: Array, return_alpha: bool = False):
    """Consolidates visual tokens.

    Args:
      features: per expert, I_i [B, N_i, d_i].
      text_embeds: T [B, L, d_text], the LLM's input embeddings of the prompt.
      text_mask: [B, L] 1 on instruction tokens; or [B, K, L] when each row has K images
        (features then hold B·K images, row-major), image k conditioned on its mask.
      return_alpha: also return the per-expert α_i [B, N^V, N_i] (float32).

    Returns:
      [B, N^V, Σ d_i] (and the list of α_i with return_alpha).
    """
    cfg = self.config
    if len(features) != len(self.expert_names):
      raise ValueError(f"CoTR got {len(features)} feature maps for experts "
                       f"{self.expert_names}")
    dense = lambda axes, name: layers.dense(cfg.cotr_dim, axes, name, self.dtype,
                                            self.param_dtype)
    scale = cfg.cotr_dim ** -0.5

    if cfg.score_norm == "rms":
      norm = lambda name, x: layers.RMSNorm(1e-6, axis_name="cotr", name=name)(x).astype(
          self.dtype)
    else:  # the raw projections, as Eq. 2–5 print them
      norm = lambda name, x: x.astype(self.dtype)
    # Î_j [B, N_j, c] for every expert j.
    visual_hat = [norm(f"{name}_visual_norm",
                       dense(("vision_embed", "cotr"), f"{name}_visual_proj")(feats))
                  for name, feats in zip(self.expert_names, features)]
    pooled_visual = [masked_pool(v, None, cfg.pool) for v in visual_hat]  # [B, c] f32
    pooled_all = sum(pooled_visual)
    text_hat = norm("text_norm", dense(("embed", "cotr"), "text_proj")(text_embeds))
    pooled_text = pool_text_per_image(text_hat, text_mask, cfg.pool)  # [B·K, c] f32
    f32_einsum = lambda spec, a, b: jnp.einsum(spec, a, b,
                                               preferred_element_type=jnp.float32)

    consolidated, alphas = [], []
    for name, feats, v_hat in zip(self.expert_names, features, visual_hat):
      queries = self.param(  # Q_i, unit scale by default (see the module docstring)
          f"{name}_queries", nn.with_logical_partitioning(
              nn.initializers.normal(cfg.query_init_std),
                                                          ("queries", "vision_embed")),
          (cfg.num_visual_tokens, feats.shape[-1]), self.param_dtype)
      q_hat = norm(f"{name}_query_norm", dense(("vision_embed", "cotr"),
                                               f"{name}_query_proj")(
          jnp.asarray(queries, self.dtype)))  # Q̂_i [N^V, c]
      s_query = f32_einsum("qc,bnc->bqn", q_hat, v_hat)
      # s_self + s_cross + s_text = (pool(Î_i) + Σ_{j≠i} pool(Î_j) + pool(T̂)) Î_iᵀ.
      # The shared terms are [B, N_i] vectors: cheap enough to form entirely in float32.
      shared = f32_einsum("bc,bnc->bn", pooled_all + pooled_text, v_hat.astype(jnp.float32))
      scores = s_query + shared[:, None, :]
      alpha = jax.nn.softmax(scores * scale, axis=-1)
      alphas.append(alpha)
      consolidated.append(jnp.einsum("bqn,bnd->bqd", alpha.astype(self.dtype),
                                     feats.astype(self.dtype)))
    out = jnp.concatenate(consolidated, axis=-1)
    out = nn.with_logical_constraint(
        out, ("activation_batch", "activation_vision_tokens", "activation_vision_embed"))
    return (out, alphas) if return_alpha else out
