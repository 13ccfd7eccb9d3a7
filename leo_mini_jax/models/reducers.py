"""Visual token reducers behind one interface, selected by `reducer.kind`.

Every reducer maps per-expert features {I_i [B, N_i, d_i]} (with each expert's grid) and
the instruction embeddings to [B, N^V, Σ d_i]:

  - 'cotr': conditional token reduction (models/cotr.py), LEO-MINI stage 3.
  - 'none': EAGLE's fusion: every expert's map resized bilinearly to a common grid and
    concatenated on channels (stages 1–2; N^V = grid²).
  - 'mqt':  a small query transformer per expert (MQT-LLaVA-style baseline, Table 5).
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax import config_utils
from leo_mini_jax.models import cotr as cotr_lib
from leo_mini_jax.models import layers
from leo_mini_jax.models.vision import positions

Array = jax.Array
KINDS = ("cotr", "none", "mqt")


@dataclasses.dataclass(frozen=True)
class ReducerConfig:
  kind: str = "none"
  num_visual_tokens: int = 64  # N^V for 'cotr' and 'mqt'
  cotr_dim: int = 256
  pool: str = "mean"
  score_norm: str = "rms"  # CoTR: 'rms' | 'none' (models/cotr.py)
  query_init_std: float = 1.0  # CoTR: std of the learned queries at init
  grid_size: int = 32  # 'none': common grid side
  mqt_layers: int = 1
  mqt_heads: int = 4
  mqt_mlp_ratio: int = 2

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"reducer.kind={self.kind!r}: expected one of {KINDS}")
    self.cotr_config()  # validates

  def cotr_config(self) -> cotr_lib.CoTRConfig:
    return cotr_lib.CoTRConfig(self.num_visual_tokens, self.cotr_dim, self.pool,
                               self.score_norm, float(self.query_init_std))

  @property
  def output_tokens(self) -> int:
    return self.grid_size ** 2 if self.kind == "none" else self.num_visual_tokens


def resize_tokens(tokens: Array, grid: tuple[int, int], size: int) -> Array:
  """[B, h·w, d] on grid (h, w) → [B, size², d], EAGLE's feature-map resize.

  torch `F.interpolate(mode='bilinear', align_corners=True)`, as EAGLE's
  MultiBackboneChannelConcatenationVisionTower resizes every expert's map to the grid.
  """
  batch, _, dim = tokens.shape
  height, width = grid
  fmap = tokens.reshape(batch, height, width, dim)
  fmap = positions.resize_bilinear_align_corners(fmap, (size, size))
  return fmap.reshape(batch, size * size, dim)


class EagleResize(nn.Module):
  """reducer.kind='none': no parameters."""
  grid_size: int

  def __call__(self, features, grids, text_embeds, text_mask):
    del text_embeds, text_mask
    return jnp.concatenate(
        [resize_tokens(f, g, self.grid_size) for f, g in zip(features, grids)], axis=-1)


class QueryTransformerBlock(nn.Module):
  """Pre-LN block: queries self-attend, cross-attend to the expert's tokens, then MLP."""
  num_heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, tokens: Array) -> Array:
    dim = queries.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: nn.LayerNorm(
        name=name, scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), **kw)
    attn = lambda name: nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("vision_embed", "vision_heads", None)),
        out_kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("vision_heads", None, "vision_embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vision_heads", None)),
        out_bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vision_embed",)),
        **kw)
    x = ln("self_attention_norm")(queries)
    queries = queries + attn("self_attention")(x, x)
    queries = queries + attn("cross_attention")(ln("cross_attention_norm")(queries),
                                                ln("tokens_norm")(tokens))
    dense = lambda features, axes, name: layers.dense(features, axes, name, **kw)
    hidden = dense(dim * self.mlp_ratio, ("vision_embed", "vision_mlp"), "fc1")(
        ln("mlp_norm")(queries))
    return queries + dense(dim, ("vision_mlp", "vision_embed"), "fc2")(nn.gelu(hidden))


class QueryTransformer(layers.PerExpertModule):
  """reducer.kind='mqt': N^V learnable queries per expert attend to that expert only."""

  @nn.compact
  def __call__(self, features, grids, text_embeds, text_mask):
    del grids, text_embeds, text_mask
    cfg = self.config
    outputs = []
    for name, feats in zip(self.expert_names, features):
      batch, _, dim = feats.shape
      queries = layers.learned_queries(self, f"{name}_queries", cfg.num_visual_tokens, dim,
                                       self.param_dtype)
      x = jnp.broadcast_to(jnp.asarray(queries, self.dtype), (batch,) + queries.shape)
      for index in range(cfg.mqt_layers):
        x = QueryTransformerBlock(cfg.mqt_heads, cfg.mqt_mlp_ratio, self.dtype,
                                  self.param_dtype, name=f"{name}_block_{index}")(x, feats)
      outputs.append(x)
    return jnp.concatenate(outputs, axis=-1)


class CoTRReducer(layers.PerExpertModule):
  """reducer.kind='cotr' behind the common interface."""

  @nn.compact
  def __call__(self, features, grids, text_embeds, text_mask):
    del grids
    cfg = self.config
    return cotr_lib.CoTR(cfg.cotr_config(), self.expert_names, self.dtype, self.param_dtype,
                         name="cotr")(features, text_embeds, text_mask)


def build_reducer(cfg: Any, expert_names: Sequence[str], dtype=jnp.float32,
                  param_dtype=jnp.float32, name: str = "reducer") -> nn.Module:
  """The reducer named by `cfg.kind` (ReducerConfig or a dict/ConfigDict)."""
  cfg = config_utils.from_config(ReducerConfig, cfg)
  names = tuple(expert_names)
  if cfg.kind == "none":
    return EagleResize(cfg.grid_size, name=name)
  if cfg.kind == "mqt":
    return QueryTransformer(cfg, names, dtype, param_dtype, name=name)
  return CoTRReducer(cfg, names, dtype, param_dtype, name=name)
