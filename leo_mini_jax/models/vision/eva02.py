"""EVA-02 ViTDet-style detection backbone (EVA-02-L of `eva02_L_coco_det_sys_o365`).

The backbone as EAGLE's `vision_models/eva_vit.py` builds it (`EVAViT`, 'eva02-l-16'):

    pixels [B, S, S, 3] ─► patch conv (p×p, stride p, with bias) ─► [B, g, g, D]   g = S/p
      + absolute position table (pretrained for another grid, class slot dropped,
        resized like torch F.interpolate(bicubic, align_corners=False))
    ─► L blocks:  x + Attn(LN₁(x));  x + SwiGLU(LN₂(x))
    ─► last block's tokens [B, g·g, D]        (no final norm; 64×64×1024 at 1024 px)

Attention: separate q/k/v projections without bias plus learned q and v biases (k has
none), 2-D rotary embeddings on q and k, scale head_dim^-½, output projection with bias.
Blocks listed in `window_block_indexes` attend within non-overlapping `window_size`²
windows: the normalised tokens are zero-padded at the bottom/right to a multiple of the
window (padding tokens are attended to, unmasked, as in ViTDet), partitioned, attended,
and cropped back. The other ("global") blocks attend over the whole grid.

Rotary embeddings (EVA's `VisionRotaryEmbeddingFast`): a table made for a
`rope_pretrain_grid`² grid, sampled at t = arange(n)·grid/n for an n×n token layout, with
frequencies θ^(−2i/(head_dim/2)); the first half of each head rotates with the row
position, the second with the column, in interleaved pairs (x₂ᵢ, x₂ᵢ₊₁) → (−x₂ᵢ₊₁, x₂ᵢ).
Windowed blocks use the table for n = window_size, global blocks the one for n = g.

SwiGLU: w3(LN(silu(w1 x) · w2 x)), all with biases, hidden = int(4·2/3·D) (2730 for D=1024);
the sub-LayerNorm on the hidden activations is always present in this backbone, the
attention's sub-LayerNorm is not (EAGLE builds the detection variant with subln=False).

Depth is handled by `nn.scan` over the shortest repeating group of blocks (for EVA-02-L:
window, window, global; 8 groups), so compile time does not grow with depth; each
position in the group is its own submodule, so its parameters are stacked over groups:
`blocks/block_{j}/attn/q_proj/kernel` is [L/k, D, D] for block j of a k-block group
(block index = group·k + j). A pattern without a shorter period is one group of L
blocks. `scan_layers=False` unrolls into `blocks_{i}/...` instead.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models.vision.expert_config import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                                      ExpertConfig)
from leo_mini_jax.models import layers
from leo_mini_jax.models.layers import TOKEN_AXES
from leo_mini_jax.models.vision.positions import interpolate_patch_positions


# EVA-02-L in EAGLE: blocks 2, 5, 8, ..., 23 attend globally, all others in windows.
EVA02_L_WINDOW_BLOCKS = tuple(i for i in range(24) if i % 3 != 2)


@dataclasses.dataclass(frozen=True)
class Eva02Config(ExpertConfig):
  """EVA-02 detection-backbone settings; defaults are EVA-02-L at 1024 px as EAGLE runs it.

  `pretrain_grid` is the side of the checkpoint's position table (14: 224 px / 16 plus a
  class slot when `pos_cls_token`); `rope_pretrain_grid` the grid the rotary tables were
  made for. mean/std are what EAGLE normalises every expert's input with (its ConvNeXt
  processor's OpenAI-CLIP statistics), not detectron2's ImageNet pixel statistics.
  """
  image_size: int = 1024
  patch_size: int = 16
  hidden_size: int = 1024
  intermediate_size: int = 2730        # int(1024 · 4 · 2/3)
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_eps: float = 1e-6
  window_size: int = 16
  window_block_indexes: tuple[int, ...] = EVA02_L_WINDOW_BLOCKS
  pretrain_grid: int = 14
  pos_cls_token: bool = True
  rope_pretrain_grid: int = 16
  rope_theta: float = 10000.0
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  attention_impl: str | None = "auto"  # see models/attention.py ('auto': cuDNN on GPU)
  scan_layers: bool = True             # nn.scan over repeating block groups (else unrolled)

  def __post_init__(self):
    attention_lib.check_implementation(self.attention_impl, "Eva02Config.attention_impl")
    object.__setattr__(self, "window_block_indexes",
                       tuple(int(i) for i in self.window_block_indexes))
    self.check_vit_sizes()
    if self.head_dim % 4:
      raise ValueError(f"Eva02Config: head_dim={self.head_dim} must be a multiple of 4 "
                       "(2-D rotary embeddings rotate pairs in each half of a head)")
    bad = [i for i in self.window_block_indexes if not 0 <= i < self.num_layers]
    if bad or len(set(self.window_block_indexes)) != len(self.window_block_indexes):
      raise ValueError(f"Eva02Config.window_block_indexes={self.window_block_indexes}: "
                       f"need distinct block indexes in [0, {self.num_layers})")
    if self.window_size <= 0 and self.window_block_indexes:
      raise ValueError(f"Eva02Config.window_size={self.window_size} must be positive "
                       "when window_block_indexes is not empty")
    self.check_normalisation()

  # Derived sizes.
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def windowed(self) -> tuple[bool, ...]:
    """Per block: whether it attends within windows."""
    return tuple(i in self.window_block_indexes for i in range(self.num_layers))

  @property
  def block_period(self) -> int:
    """Length k of the shortest group of blocks whose repetition gives the pattern."""
    pattern = self.windowed
    for k in range(1, self.num_layers + 1):
      if self.num_layers % k == 0 and pattern == pattern[:k] * (self.num_layers // k):
        return k
    return self.num_layers


def rope_tables(side: int, pretrain_grid: int, head_dim: int, theta: float = 10000.0
                ) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin) [side², head_dim] float32: EVA's `VisionRotaryEmbeddingFast` buffers.

  `dim` = head_dim/2 per axis: frequencies θ^(−arange(0, dim, 2)/dim), positions
  t = arange(side)/side·pretrain_grid, each frequency repeated twice (interleaved pairs);
  token (r, c) of the row-major layout gets [row freqs(r) | column freqs(c)]. float32
  arithmetic as in the torch buffers.
  """
  dim = head_dim // 2
  freqs = np.float32(1.0) / (np.float32(theta) ** (
      np.arange(0, dim, 2, dtype=np.float32)[:dim // 2] / np.float32(dim)))
  t = np.arange(side, dtype=np.float32) / np.float32(side) * np.float32(pretrain_grid)
  axis = np.repeat(t[:, None] * freqs[None, :], 2, axis=-1)               # [side, dim]
  rows = np.broadcast_to(axis[:, None, :], (side, side, dim))
  cols = np.broadcast_to(axis[None, :, :], (side, side, dim))
  angles = np.concatenate([rows, cols], axis=-1).reshape(side * side, 2 * dim)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x·cos + rotate_half(x)·sin with interleaved pairs; x [..., N, heads, hd], tables [N, hd].

  Computed in float32 and cast back to x's dtype (EVA: `.type_as(v)`).
  """
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] → ([B·nh·nw, window², C], (Hp, Wp)), zero-padding bottom/right."""
  batch, height, width, channels = x.shape
  pad_h, pad_w = -height % window, -width % window
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = height + pad_h, width + pad_w
  x = x.reshape(batch, hp // window, window, wp // window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)
  return x, (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: [B·nh·nw, window², C] → [B, H, W, C] (padding cropped)."""
  (hp, wp), (height, width) = padded, size
  channels = windows.shape[-1]
  batch = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(batch, hp // window, wp // window, window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, channels)
  return x[:, :height, :width]


class Eva02Attention(nn.Module):
  """Rotary multi-head attention over token groups: [G, N, D] → [G, N, D].

  `side` is the side of the square token layout of each group (the window, or the whole
  grid), which picks the rotary table.
  """
  config: Eva02Config
  side: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    groups, length, dim = x.shape
    if length != self.side ** 2:
      raise ValueError(f"Eva02Attention: {length} tokens per group, expected {self.side}²")
    param_dtype = jnp.dtype(cfg.param_dtype)
    bias = lambda name: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, ("vision_heads",)),
        (dim,), param_dtype)
    split = lambda t: t.reshape(groups, length, cfg.num_heads, cfg.head_dim)
    # EVA: q and v carry a bias, k does not (a k bias would cancel in the softmax).
    q = layers.dense(dim, layers.QKV_AXES, "q_proj", *cfg.dtypes, use_bias=False)(x)
    k = layers.dense(dim, layers.QKV_AXES, "k_proj", *cfg.dtypes, use_bias=False)(x)
    v = layers.dense(dim, layers.QKV_AXES, "v_proj", *cfg.dtypes, use_bias=False)(x)
    q = split(q + bias("q_bias").astype(q.dtype))
    k = split(k)
    v = split(v + bias("v_bias").astype(v.dtype))
    cos, sin = (jnp.asarray(t) for t in rope_tables(
        self.side, cfg.rope_pretrain_grid, cfg.head_dim, cfg.rope_theta))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # The XLA path takes the softmax in float32 and casts back to the input dtype.
    out = attention_lib.dot_product_attention(q, k, v, cfg.attention_impl,
                                              scale=cfg.head_dim ** -0.5)
    out = out.reshape(groups, length, dim)
    return layers.dense(dim, layers.ATTN_OUT_AXES, "proj", *cfg.dtypes)(out)


class Eva02SwiGLU(nn.Module):
  """w3(LN(silu(w1 x) · w2 x)): [..., D] → [..., D]."""
  config: Eva02Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    hidden = cfg.intermediate_size
    gate = layers.dense(hidden, layers.MLP_IN_AXES, "w1", *cfg.dtypes)(x)
    up = layers.dense(hidden, layers.MLP_IN_AXES, "w2", *cfg.dtypes)(x)
    h = layers.layer_norm("ffn_ln", cfg.layer_norm_eps, *cfg.dtypes)(nn.silu(gate) * up)
    return layers.dense(cfg.hidden_size, layers.MLP_OUT_AXES, "w3", *cfg.dtypes)(h)


class Eva02Block(nn.Module):
  """One pre-norm block on [B, g·g, D] tokens of a g×g grid, windowed or global."""
  config: Eva02Config
  grid: int
  windowed: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    batch, length, dim = x.shape
    norm = lambda name: layers.layer_norm(name, cfg.layer_norm_eps, *cfg.dtypes)
    h = norm("norm1")(x)
    if self.windowed:
      windows, padded = window_partition(h.reshape(batch, self.grid, self.grid, dim),
                                         cfg.window_size)
      out = Eva02Attention(cfg, cfg.window_size, name="attn")(windows)
      out = window_unpartition(out, cfg.window_size, padded, (self.grid, self.grid))
      out = out.reshape(batch, length, dim)
    else:
      out = Eva02Attention(cfg, self.grid, name="attn")(h)
    x = x + out
    x = x + Eva02SwiGLU(cfg, name="mlp")(norm("norm2")(x))
    return nn.with_logical_constraint(x, TOKEN_AXES)


class Eva02BlockGroup(nn.Module):
  """`pattern` consecutive blocks (True = windowed) as one `nn.scan` body."""
  config: Eva02Config
  grid: int
  pattern: tuple[bool, ...]

  @nn.compact
  def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
    cfg = self.config
    # Inside a scan the loop already keeps XLA from CSE-ing the recomputation away.
    block_cls = nn.remat(Eva02Block, prevent_cse=False) if cfg.remat else Eva02Block
    for j, windowed in enumerate(self.pattern):
      x = block_cls(cfg, self.grid, windowed, name=f"block_{j}")(x)
    return x, None


class Eva02Tower(nn.Module):
  """EVA-02 backbone: normalised pixels → last-block tokens [B, g·g, D]."""
  config: Eva02Config

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Args: pixels [B, S, S, 3] normalised float, S a multiple of patch_size.

    Returns: [B, (S/p)², hidden_size].
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    batch, height, width, _ = pixels.shape
    if height != width or height % cfg.patch_size:
      raise ValueError(f"Eva02Tower: image {height}×{width} must be square and a multiple "
                       f"of patch_size={cfg.patch_size}")
    grid = height // cfg.patch_size
    dim = cfg.hidden_size

    x = layers.conv(dim, cfg.patch_size, "patch_embed", dtype, param_dtype,
                    stride=cfg.patch_size, axes=layers.PATCH_EMBED_AXES)(pixels.astype(dtype))
    x = x.reshape(batch, grid * grid, dim)

    num_positions = cfg.pretrain_grid ** 2 + int(cfg.pos_cls_token)
    pos_embed = self.param(
        "pos_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vision_pos", "vision_embed")),
        (num_positions, dim), param_dtype)
    patch_pos = pos_embed[1:] if cfg.pos_cls_token else pos_embed
    x = x + interpolate_patch_positions(patch_pos, (grid, grid)).astype(dtype)[None]
    x = nn.with_logical_constraint(x, TOKEN_AXES)

    pattern = cfg.windowed
    if cfg.scan_layers:
      period = cfg.block_period
      x, _ = nn.scan(
          Eva02BlockGroup, variable_axes={"params": 0}, split_rngs={"params": True},
          length=cfg.num_layers // period, metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, grid, pattern[:period], name="blocks")(x)
    else:
      block_cls = nn.remat(Eva02Block) if cfg.remat else Eva02Block
      for i, windowed in enumerate(pattern):
        x = block_cls(cfg, grid, windowed, name=f"blocks_{i}")(x)
    return x
