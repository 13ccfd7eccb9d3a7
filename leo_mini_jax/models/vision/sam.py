"""SAM ViT image encoder (HF transformers `SamVisionEncoder`), with HF's or EAGLE's neck.

    pixels [B, S, S, 3] ─► patch conv (p×p, stride p, bias) ─► [B, g, g, D]   (g = S/p)
      + absolute position embeddings (g·g, D)
    ─► L × (x + Attn(LN₁(x)); x + MLP(LN₂(x)))
         Attn: windowed (w×w windows, the grid zero-padded to a multiple of w) or, in the
         blocks `global_attn_indexes`, global over the whole grid; logits get decomposed
         relative position terms q·R_h[qh−kh] + q·R_w[qw−kw] (MViTv2, HF's
         `add_decomposed_rel_pos`), whose tables are (2w−1, d_head) in windowed and
         (2g−1, d_head) in global blocks.
    ─► neck:
         'hf':    1×1 conv (no bias) ─► LN ─► 3×3 conv (no bias) ─► LN     [B, g·g, C]
         'eagle': 1×1 conv (no bias) ─► LN ─► pixel-unshuffle r            [B, (g/r)², C·r²]

'hf' is HF's `last_hidden_state` (NCHW there) flattened row-major. 'eagle' is EAGLE's
SAM expert (`eagle/model/multimodal_encoder/sam_encoder.py`): the encoder with HF's neck
replaced by a new `ShortSamVisionNeck` (fresh weights, parameters here under
`eagle_neck/`) and torch's `pixel_unshuffle(2)`, whose channel order is c·r² + i·r + j for
the offset (i, j) inside each r×r block; at 1024 px that gives 32×32 tokens of 1024.

The blocks run under `nn.scan` over the repeating group of blocks (five windowed and one
global for ViT-L/H's global blocks 5, 11, 17, 23): block j of the group has its
parameters at `layers/blocks_{j}/...`, stacked over groups on a leading axis. A pattern
that does not repeat is one group of all L blocks (a scan of length 1, i.e. unrolled).

The position table and the global blocks' relative tables exist for `image_size` only;
like HF (whose patch embedding rejects other sizes) the tower runs at that size.
"""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models import layers
from leo_mini_jax.models.layers import MAP_AXES, TOKEN_AXES
from leo_mini_jax.models.vision.expert_config import ExpertConfig

# SamImageProcessor's normalisation (the ImageNet statistics).
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)

NECKS = ("eagle", "hf")
# The neck's LayerNorm2d is not a config field in HF (SamLayerNorm's default).
NECK_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SamConfig(ExpertConfig):
  """SAM image-encoder settings; defaults are `facebook/sam-vit-large` in EAGLE's arrangement.

  `neck='hf'` gives HF's `last_hidden_state` ([B, g², output_channels]); `neck='eagle'`
  (LEO-MINI's expert) the new 1×1-conv + LN neck and a pixel-unshuffle by
  `pixel_unshuffle` ([B, (g/r)², output_channels·r²]).
  """
  image_size: int = 1024
  patch_size: int = 16
  hidden_size: int = 1024
  mlp_dim: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
  qkv_bias: bool = True
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  layer_norm_eps: float = 1e-6
  output_channels: int = 256
  neck: str = "eagle"
  pixel_unshuffle: int = 2
  mean: tuple[float, ...] = SAM_MEAN
  std: tuple[float, ...] = SAM_STD
  attention_impl: str | None = "auto"  # see models/attention.py ('auto': cuDNN on GPU)

  def __post_init__(self):
    attention_lib.check_implementation(self.attention_impl, "SamConfig.attention_impl")
    object.__setattr__(self, "global_attn_indexes",
                       tuple(int(i) for i in self.global_attn_indexes))
    if self.neck not in NECKS:
      raise ValueError(f"SamConfig.neck={self.neck!r}: expected one of {NECKS}")
    self.check_vit_sizes()
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"SamConfig.global_attn_indexes {bad} are not blocks of a "
                       f"{self.num_layers}-block encoder")
    if self.window_size < 0:
      raise ValueError(f"SamConfig.window_size={self.window_size} must be >= 0 (0: global)")
    if self.neck == "eagle" and (self.pixel_unshuffle < 1 or self.grid % self.pixel_unshuffle):
      raise ValueError(f"SamConfig.pixel_unshuffle={self.pixel_unshuffle} does not divide "
                       f"the {self.grid}×{self.grid} grid")
    self.check_normalisation()

  # What the expert registry reads beyond ExpertConfig's defaults (see experts.py).
  @property
  def output_grid(self) -> tuple[int, int]:
    side = self.grid // (self.pixel_unshuffle if self.neck == "eagle" else 1)
    return side, side

  @property
  def feature_dim(self) -> int:
    if self.neck == "eagle":
      return self.output_channels * self.pixel_unshuffle ** 2
    return self.output_channels

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def block_window(self, index: int) -> int:
    """Window side of block `index`; 0 for a global block."""
    return 0 if index in self.global_attn_indexes else self.window_size

  @property
  def block_period(self) -> int:
    """Length of the repeating group of blocks (num_layers when the pattern is irregular)."""
    windows = [self.block_window(i) for i in range(self.num_layers)]
    for period in range(1, self.num_layers + 1):
      if self.num_layers % period == 0 and all(
          windows[i] == windows[i % period] for i in range(self.num_layers)):
        return period
    return self.num_layers


def relative_positions(table: jax.Array, size: int) -> jax.Array:
  """[2·size−1, d] table → [size, size, d] with out[q, k] = table[q − k + size − 1].

  HF's `get_rel_pos` for equal query and key sizes (its linear resize is then the
  identity, and the table must have exactly 2·size−1 rows).
  """
  if table.shape[0] != 2 * size - 1:
    raise ValueError(f"relative position table has {table.shape[0]} rows; a {size}-wide "
                     f"attention needs {2 * size - 1}")
  index = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + size - 1
  return table[index]


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] → [B·nh·nw, window, window, C], zero-padding H, W up to multiples.

  Returns the windows and the padded (H, W). Padding comes after the LayerNorm, so
  padded tokens are zeros that still act as keys (HF does not mask them).
  """
  batch, height, width, channels = x.shape
  pad_h, pad_w = -height % window, -width % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = height + pad_h, width + pad_w
  x = x.reshape(batch, hp // window, window, wp // window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
  return x, (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, cropping the padding: → [B, H, W, C]."""
  hp, wp = padded
  channels = windows.shape[-1]
  batch = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(batch, hp // window, wp // window, window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, channels)
  return x[:, :size[0], :size[1]]


class SamAttention(nn.Module):
  """Multi-head attention on [N, h, w, D] maps with decomposed relative positions.

  `size` is h = w: the window side, or the grid side in a global block.
  """
  config: SamConfig
  size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, h, w, D] → [N, h, w, D]."""
    cfg = self.config
    num, height, width, dim = x.shape
    heads, head_dim = cfg.num_heads, cfg.head_dim
    split = lambda t: t.reshape(num, height * width, heads, head_dim)
    # HF's fused qkv is stored as three projections (split by the port).
    q, k, v = (split(layers.dense(dim, layers.QKV_AXES, name, *cfg.dtypes,
                            use_bias=cfg.qkv_bias)(x))
               for name in ("q_proj", "k_proj", "v_proj"))
    bias = None
    if cfg.use_rel_pos:
      tables = [self.param(
          name, nn.with_logical_partitioning(nn.initializers.zeros, ("vision_pos", None)),
          (2 * self.size - 1, head_dim), jnp.dtype(cfg.param_dtype))
          for name in ("rel_pos_h", "rel_pos_w")]
      rel_h, rel_w = (relative_positions(t.astype(q.dtype), self.size) for t in tables)
      grid_q = q.reshape(num, height, width, heads, head_dim)
      # The unscaled query meets the tables (HF adds these after scaling q·kᵀ).
      bias_h = jnp.einsum("bhwnc,hkc->bnhwk", grid_q, rel_h)   # [N, heads, h, w, kh]
      bias_w = jnp.einsum("bhwnc,wkc->bnhwk", grid_q, rel_w)   # [N, heads, h, w, kw]
      bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(
          num, heads, height * width, height * width)
    out = attention_lib.dot_product_attention(q, k, v, cfg.attention_impl, bias=bias,
                                              scale=head_dim ** -0.5)
    out = out.reshape(num, height, width, dim)
    return layers.dense(dim, layers.ATTN_OUT_AXES, "proj", *cfg.dtypes)(out)


class SamBlock(nn.Module):
  """x + Attn(LN₁(x)) (windowed when `window` > 0, else global), then x + MLP(LN₂(x))."""
  config: SamConfig
  window: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, g, g, D] → [B, g, g, D]."""
    cfg = self.config
    _, height, width, _ = x.shape
    norm = lambda name: layers.layer_norm(name, cfg.layer_norm_eps, *cfg.dtypes)
    h = norm("layer_norm1")(x)
    if self.window > 0:
      windows, padded = window_partition(h, self.window)
      windows = SamAttention(cfg, self.window, name="attn")(windows)
      h = window_unpartition(windows, self.window, padded, (height, width))
    else:
      h = SamAttention(cfg, height, name="attn")(h)
    x = x + h
    mlp = layers.Mlp(cfg.mlp_dim, cfg.hidden_size, layers.exact_gelu, ("lin1", "lin2"),
                     *cfg.dtypes, name="mlp")
    x = x + mlp(norm("layer_norm2")(x))
    return nn.with_logical_constraint(x, MAP_AXES)


class SamBlockGroup(nn.Module):
  """One repeat of the block pattern: its `block_period` blocks as `blocks_{j}`.

  Signature fits `nn.scan`: (carry, _) → (carry, None).
  """
  config: SamConfig

  @nn.compact
  def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
    cfg = self.config
    # Inside the scan the loop already keeps XLA from CSE-ing the recomputation away.
    block_cls = nn.remat(SamBlock, prevent_cse=False) if cfg.remat else SamBlock
    for j in range(cfg.block_period):
      x = block_cls(cfg, cfg.block_window(j), name=f"blocks_{j}")(x)
    return x, None


class SamNeck(nn.Module):
  """HF's SamVisionNeck on NHWC: 1×1 conv → LN → 3×3 conv (pad 1) → LN, no conv biases."""
  config: SamConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = layers.conv(cfg.output_channels, 1, "conv1", *cfg.dtypes, use_bias=False)(x)
    x = layers.layer_norm("layer_norm1", NECK_NORM_EPS, *cfg.dtypes)(x)
    x = layers.conv(cfg.output_channels, 3, "conv2", *cfg.dtypes, padding=((1, 1), (1, 1)),
                    use_bias=False)(x)
    return layers.layer_norm("layer_norm2", NECK_NORM_EPS, *cfg.dtypes)(x)


class EagleSamNeck(nn.Module):
  """EAGLE's ShortSamVisionNeck on NHWC: 1×1 conv (no bias) → LN."""
  config: SamConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = layers.conv(cfg.output_channels, 1, "conv1", *cfg.dtypes, use_bias=False)(x)
    return layers.layer_norm("layer_norm1", NECK_NORM_EPS, *cfg.dtypes)(x)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
  """torch `pixel_unshuffle` on NHWC: [B, H, W, C] → [B, H/r, W/r, C·r²].

  Output channel c·r² + i·r + j holds input channel c at offset (i, j) of each r×r block.
  """
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
  x = x.transpose(0, 1, 3, 5, 2, 4)   # [B, H/r, W/r, C, i, j]
  return x.reshape(batch, height // factor, width // factor, channels * factor * factor)


class SamVisionTower(nn.Module):
  """SAM image encoder: normalised pixels → neck features as tokens."""
  config: SamConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Args: pixels [B, image_size, image_size, 3] normalised float.

    Returns: [B, h·w, feature_dim] row-major over `output_grid`.
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch, height, width, _ = pixels.shape
    if (height, width) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"SamVisionTower: image {height}×{width}, but the position tables "
                       f"are for {cfg.image_size}×{cfg.image_size} (SamConfig.image_size)")
    grid, dim = cfg.grid, cfg.hidden_size

    x = layers.conv(dim, cfg.patch_size, "patch_embed", dtype, param_dtype,
                    stride=cfg.patch_size, axes=layers.PATCH_EMBED_AXES)(pixels.astype(dtype))
    if cfg.use_abs_pos:
      pos_embed = self.param(
          "pos_embed",
          nn.with_logical_partitioning(nn.initializers.zeros, ("vision_pos", "vision_embed")),
          (grid * grid, dim), param_dtype)
      x = x + pos_embed.astype(dtype).reshape(1, grid, grid, dim)
    x = nn.with_logical_constraint(x, MAP_AXES)

    x, _ = nn.scan(SamBlockGroup, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=cfg.num_layers // cfg.block_period,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")(x)

    if cfg.neck == "hf":
      x = SamNeck(cfg, name="neck")(x)
    else:
      x = EagleSamNeck(cfg, name="eagle_neck")(x)
      x = pixel_unshuffle(x, cfg.pixel_unshuffle)
    _, out_h, out_w, channels = x.shape
    return nn.with_logical_constraint(x.reshape(batch, out_h * out_w, channels), TOKEN_AXES)
