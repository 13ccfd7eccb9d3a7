"""CLIP ViT vision tower (the HF transformers `CLIPVisionModel` architecture).

    pixels [B, H, W, 3] ─► patch conv (p×p, stride p, no bias) ─► [B, (H/p)(W/p), D]
      + position embeddings (bicubically interpolated when H ≠ pretrained size)
      [class token first, `cls_token='keep'` only]
    ─► pre-LayerNorm ─► L × (x + MHA(LN(x)); x + MLP(LN(x))) ─► patch tokens [B, N, D]

The L layers run under `nn.scan`: their parameters are stacked on a leading axis
(`layers/self_attn/q_proj/kernel` is [L, D, D]).

The output is the last layer's hidden states without the post-LayerNorm (HF applies that
to the pooled class token only) and without the class token.

`cls_token` chooses where the class token leaves:
  * 'keep': HF's forward. The class token is concatenated, attends through every layer
    and is dropped from the output only.
  * 'drop': EAGLE's HR-CLIP (the LEO-MINI default). The class token and its position
    embedding are removed right after the embeddings, before the pre-LayerNorm, so the
    encoder sees patch tokens only.
Both modes create the same parameters, so one checkpoint ports to either.

Position embeddings exist for `pretrained_image_size`. At another image size the patch
grid is resized like HF's `interpolate_pos_encoding`, i.e. torch
`F.interpolate(mode='bicubic', align_corners=False, size=(h, w))`, with the shared
torch-exact kernel of `positions.py`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models import layers
from leo_mini_jax.models.layers import TOKEN_AXES
from leo_mini_jax.models.vision.expert_config import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                                      ExpertConfig)
from leo_mini_jax.models.vision.positions import interpolate_patch_positions

HIDDEN_ACTS = ("quick_gelu", "gelu")
CLS_TOKEN_MODES = ("drop", "keep")


@dataclasses.dataclass(frozen=True)
class ClipConfig(ExpertConfig):
  """CLIP ViT settings; defaults are OpenAI ViT-L/14 at 336 px.

  `pretrained_image_size` is the size the position embeddings were trained for (None →
  `image_size`; filled in at construction, so `dataclasses.replace(cfg, image_size=...)`
  keeps the trained grid). `image_size` is the size the tower runs at.
  """
  image_size: int = 336
  patch_size: int = 14
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  cls_token: str = "drop"
  pretrained_image_size: int | None = None
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  attention_impl: str | None = "auto"  # see models/attention.py ('auto': cuDNN on GPU)

  def __post_init__(self):
    if self.pretrained_image_size is None:
      object.__setattr__(self, "pretrained_image_size", self.image_size)
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"ClipConfig.hidden_act={self.hidden_act!r}: expected one of {HIDDEN_ACTS}")
    if self.cls_token not in CLS_TOKEN_MODES:
      raise ValueError(
          f"ClipConfig.cls_token={self.cls_token!r}: expected one of {CLS_TOKEN_MODES}")
    self.check_vit_sizes("image_size", "pretrained_image_size")
    self.check_normalisation()
    attention_lib.check_implementation(self.attention_impl, "ClipConfig.attention_impl")

  # Derived sizes.
  @property
  def pretrained_grid(self) -> int:
    return self.pretrained_image_size // self.patch_size


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x·σ(1.702x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections, scale head_dim^-½."""
  config: ClipConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, N, D] → [B, N, D]."""
    cfg = self.config
    batch, length, dim = x.shape
    head_dim = dim // cfg.num_heads
    split = lambda t: t.reshape(batch, length, cfg.num_heads, head_dim)
    q = split(layers.dense(dim, layers.QKV_AXES, "q_proj", *cfg.dtypes)(x))
    k = split(layers.dense(dim, layers.QKV_AXES, "k_proj", *cfg.dtypes)(x))
    v = split(layers.dense(dim, layers.QKV_AXES, "v_proj", *cfg.dtypes)(x))
    # The XLA path takes the softmax in float32 and casts back to the input dtype.
    out = attention_lib.dot_product_attention(q, k, v, cfg.attention_impl,
                                              scale=head_dim ** -0.5)
    out = out.reshape(batch, length, dim)
    return layers.dense(dim, layers.ATTN_OUT_AXES, "out_proj", *cfg.dtypes)(out)


class ClipEncoderLayer(nn.Module):
  """Pre-norm transformer block: x + MHA(LN₁(x)), then x + MLP(LN₂(x)).

  Returns (x, None): the (carry, output) pair `nn.scan` expects.
  """
  config: ClipConfig

  @nn.compact
  def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
    cfg = self.config
    norm = lambda name: layers.layer_norm(name, cfg.layer_norm_eps, *cfg.dtypes)
    x = x + ClipAttention(cfg, name="self_attn")(norm("layer_norm1")(x))
    act = quick_gelu if cfg.hidden_act == "quick_gelu" else layers.exact_gelu
    mlp = layers.Mlp(cfg.intermediate_size, cfg.hidden_size, act, ("fc1", "fc2"), *cfg.dtypes,
                     name="mlp")
    x = x + mlp(norm("layer_norm2")(x))
    return nn.with_logical_constraint(x, TOKEN_AXES), None


class ClipVisionTower(nn.Module):
  """CLIP ViT: normalised pixels → last-layer patch tokens (no post-LN, no class token)."""
  config: ClipConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Args: pixels [B, H, W, 3] normalised float (H, W multiples of patch_size).

    Returns: [B, (H/p)·(W/p), hidden_size].
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch, height, width, _ = pixels.shape
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"ClipVisionTower: image {height}×{width} is not a multiple of "
                       f"patch_size={cfg.patch_size}")
    grid = (height // cfg.patch_size, width // cfg.patch_size)
    dim = cfg.hidden_size

    patches = layers.conv(dim, cfg.patch_size, "patch_embedding", dtype, param_dtype,
                          stride=cfg.patch_size, use_bias=False,
                          axes=layers.PATCH_EMBED_AXES)(pixels.astype(dtype))
    patches = patches.reshape(batch, grid[0] * grid[1], dim)

    class_embedding = self.param(
        "class_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(dim ** -0.5), ("vision_embed",)),
        (dim,), param_dtype)
    num_positions = cfg.pretrained_grid ** 2 + 1
    position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vision_pos", "vision_embed")),
        (num_positions, dim), param_dtype)

    patch_pos = interpolate_patch_positions(position_embedding[1:], grid)
    x = patches + patch_pos.astype(dtype)[None]
    if cfg.cls_token == "keep":
      cls = (class_embedding + position_embedding[0]).astype(dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, dim)), x], axis=1)
    x = nn.with_logical_constraint(x, TOKEN_AXES)

    x = layers.layer_norm("pre_layernorm", cfg.layer_norm_eps, *cfg.dtypes)(x)
    x, _ = layers.scanned(ClipEncoderLayer, cfg.num_layers, cfg.remat, cfg, name="layers")(x)

    if cfg.cls_token == "keep":
      x = x[:, 1:]
    return x
