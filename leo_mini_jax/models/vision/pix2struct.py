"""Pix2Struct vision encoder (the HF transformers `Pix2StructVisionModel` architecture).

Pix2Struct reads an image as a sequence of flattened patches, each row
`[row_id, col_id, p·p·3 pixel values]` with 1-based ids (id 0 marks a padding row):

    flattened patches [B, N, 2 + p²·3]
    ─► Linear(p²·3 → D, bias) + row_embedder[row_id] + column_embedder[col_id]
    ─► L × (x + MHA(RMSNorm(x)); x + GatedGELU(RMSNorm(x)))  (no biases, no q·k scaling)
    ─► final RMSNorm ─► [B, N, D]   (HF's `last_hidden_state`)

The norms are T5's: RMS without mean subtraction or bias. The MLP is T5's gated form
`wo(gelu_tanh(wi_0 x) · wi_1 x)`. Attention has `num_heads × head_dim` channels (HF `d_kv`,
which need not divide D) and masks the keys of padding rows; padding rows still produce
outputs (as in HF), nothing reads them.

Two modules share one parameter tree:
  * `Pix2StructEncoder`: `apply({'params': p}, flattened_patches, attention_mask)`, the HF
    interface, for parity and for callers that build patches themselves.
  * `Pix2StructTower`: the LEO-MINI expert. It takes the square `image_size` image with
    [0, 1] values (the config's mean 0 / std 1 make the registry's normalisation the
    identity; at the default 1024 the registry passes the master image through
    unresized) and builds the patches on device in the order and with the kernels of
    `Pix2StructImageProcessor` (`image_patches`): per-image standardisation at
    `image_size`, then an antialiased bilinear resize to the patch grid the processor's
    `max_patches` formula gives, then patch extraction.

EAGLE's arrangement (NVlabs/EAGLE `pix2struct_encoder.py`): the 1024² master image goes
through the processor with `max_patches=2048`, which for a square image gives a 45×45
grid (720 px at patch 16) padded with 23 empty rows to 2048; the encoder's
`last_hidden_state[:, :2025]` is read as the 45×45 grid. The padding rows are masked
out as keys, so they change nothing in the first 2025 outputs: the tower runs on the
2025 real patches only.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models.vision.expert_config import ExpertConfig
from leo_mini_jax.models import layers
from leo_mini_jax.models.layers import TOKEN_AXES

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")
# The processor standardises pixel values in [0, 255] (EAGLE multiplies its [0, 1] images
# by 255 before calling it); the scale matters only through the std floor 1/√(H·W·3).
PIXEL_SCALE = 255.0


def processor_grid(height: int, width: int, max_patches: int, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of patches `Pix2StructImageProcessor` resizes an image of this size to.

  The processor's own formula: scale = √(max_patches · p/H · p/W), rows = ⌊scale·H/p⌋,
  cols = ⌊scale·W/p⌋, each clamped to [1, max_patches].
  """
  scale = (max_patches * (patch_size / height) * (patch_size / width)) ** 0.5
  rows = max(min(int(scale * height / patch_size), max_patches), 1)
  cols = max(min(int(scale * width / patch_size), max_patches), 1)
  return rows, cols


@dataclasses.dataclass(frozen=True)
class Pix2StructConfig(ExpertConfig):
  """Pix2Struct vision encoder settings; defaults are `google/pix2struct-large`'s encoder.

  HF names: `hidden_size`, `num_hidden_layers` → num_layers, `num_attention_heads` →
  num_heads, `d_kv` → head_dim, `d_ff` → mlp_dim, `seq_len` (rows of the row/column
  tables), `patch_embed_hidden_size` = 3·patch_size², `dense_act_fn`, `layer_norm_eps`.
  `image_size` is the square image the tower receives; with `max_patches` it sets the
  patch grid by the processor's formula (`processor_grid`; 45×45 for 2048 at any size).
  """
  hidden_size: int = 1536
  num_layers: int = 18
  num_heads: int = 24
  head_dim: int = 64
  mlp_dim: int = 3968
  patch_size: int = 16
  seq_len: int = 4096
  layer_norm_eps: float = 1e-6
  dense_act_fn: str = "gelu_new"
  max_patches: int = 2048
  image_size: int = 1024               # EAGLE's master image: standardised before resizing
  mean: tuple[float, ...] = (0.0, 0.0, 0.0)
  std: tuple[float, ...] = (1.0, 1.0, 1.0)
  attention_impl: str | None = "auto"  # see models/attention.py ('auto': cuDNN on GPU)

  def __post_init__(self):
    attention_lib.check_implementation(self.attention_impl, "Pix2StructConfig.attention_impl")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"Pix2StructConfig.dense_act_fn={self.dense_act_fn!r}: expected one of "
                       f"{ACTIVATIONS}")
    for field in ("hidden_size", "num_layers", "num_heads", "head_dim", "mlp_dim", "patch_size",
                  "max_patches", "image_size"):
      if getattr(self, field) < 1:
        raise ValueError(f"Pix2StructConfig.{field}={getattr(self, field)} must be positive")
    if self.grid_side >= self.seq_len:
      raise ValueError(f"Pix2StructConfig: a {self.grid_side}×{self.grid_side} grid needs ids up "
                       f"to {self.grid_side}, but seq_len={self.seq_len} rows of the position "
                       "tables only reach ids < seq_len")
    self.check_normalisation()

  @property
  def patch_dim(self) -> int:
    """Pixel values per patch (HF `patch_embed_hidden_size`)."""
    return self.patch_size * self.patch_size * 3

  @property
  def grid_side(self) -> int:
    """Patches a side for the square `image_size` image (the processor's formula)."""
    return processor_grid(self.image_size, self.image_size, self.max_patches,
                          self.patch_size)[0]

  @property
  def resized_size(self) -> int:
    """The side the processor resizes the image to (grid_side · patch_size; 720 for large)."""
    return self.grid_side * self.patch_size

  # What the expert registry reads beyond ExpertConfig's defaults (see experts.py).
  @property
  def output_grid(self) -> tuple[int, int]:
    return self.grid_side, self.grid_side


def image_patches(pixels: jax.Array, patch_size: int, grid: tuple[int, int] | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The processor's standardisation, resize and patch extraction on device.

  Args:
    pixels: [B, H, W, 3] values in [0, 1].
    patch_size: p.
    grid: (rows, cols) of patches to resize to; None: (H/p, W/p), no resize (H, W
      multiples of p).

  Returns:
    (patches [B, rows·cols, p·p·3] float32, row_ids, col_ids [rows·cols] int32, 1-based).
    Patches are row-major over the grid, each flattened in (pixel row, pixel column,
    channel) order as the processor's `torch_extract_patches` does. Standardisation is
    per image over all pixels and channels of the [0, 255]-scaled image:
    (x − mean) / max(std, 1/√(H·W·3)), std without Bessel's correction (the numpy
    processor's `np.std`; the torchvision one uses N−1, a relative 1/(2·H·W·3) apart).
    It happens before the resize, as in the processor. The resize is bilinear with
    antialiasing (torch `interpolate(mode='bilinear', antialias=True)`, which the
    processor calls, and `jax.image.resize(antialias=True)` agree to ~1e-6).
  """
  batch, height, width, channels = pixels.shape
  if grid is None:
    if height % patch_size or width % patch_size:
      raise ValueError(f"image_patches: image {height}×{width} is not a multiple of "
                       f"patch_size={patch_size}")
    grid = (height // patch_size, width // patch_size)
  x = pixels.astype(jnp.float32) * PIXEL_SCALE
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True))
  x = (x - mean) / jnp.maximum(std, 1.0 / math.sqrt(height * width * channels))
  rows, cols = grid
  if (rows * patch_size, cols * patch_size) != (height, width):
    x = jax.image.resize(x, (batch, rows * patch_size, cols * patch_size, channels),
                         method="bilinear", antialias=True)
  x = x.reshape(batch, rows, patch_size, cols, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  patches = x.reshape(batch, rows * cols, patch_size * patch_size * channels)
  row_ids = jnp.repeat(jnp.arange(1, rows + 1, dtype=jnp.int32), cols)
  col_ids = jnp.tile(jnp.arange(1, cols + 1, dtype=jnp.int32), rows)
  return patches, row_ids, col_ids


def flattened_patches(pixels: jax.Array, patch_size: int, grid: tuple[int, int] | None = None
                      ) -> jax.Array:
  """[B, H, W, 3] in [0, 1] → the processor's rows [B, N, 2 + p²·3] (no padding rows)."""
  patches, row_ids, col_ids = image_patches(pixels, patch_size, grid)
  ids = jnp.stack([row_ids, col_ids], axis=-1).astype(jnp.float32)
  ids = jnp.broadcast_to(ids, (patches.shape[0],) + ids.shape)
  return jnp.concatenate([ids, patches], axis=-1)


def _bias_free_dense(features: int, axes: tuple[str, str], name: str,
                     cfg: Pix2StructConfig) -> nn.Dense:
  # T5 has no biases in its blocks.
  return layers.dense(features, axes, name, *cfg.dtypes, use_bias=False)


def _norm(name: str, cfg: Pix2StructConfig) -> layers.RMSNorm:
  # T5's norm: f32 statistics, cast back to the compute dtype, then the scale.
  return layers.RMSNorm(cfg.layer_norm_eps, *cfg.dtypes, name=name)


class Pix2StructAttention(nn.Module):
  """Bias-free multi-head self-attention, logits unscaled (T5), padding keys masked."""
  config: Pix2StructConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B, N, D], mask [B, 1, 1, N] bool (True = attend) or None → [B, N, D]."""
    cfg = self.config
    batch, length, dim = x.shape
    inner = cfg.num_heads * cfg.head_dim
    split = lambda t: t.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    q = split(_bias_free_dense(inner, layers.QKV_AXES, "query", cfg)(x))
    k = split(_bias_free_dense(inner, layers.QKV_AXES, "key", cfg)(x))
    v = split(_bias_free_dense(inner, layers.QKV_AXES, "value", cfg)(x))
    out = attention_lib.dot_product_attention(q, k, v, cfg.attention_impl, mask=mask,
                                              scale=1.0)
    return _bias_free_dense(dim, layers.ATTN_OUT_AXES, "output", cfg)(
        out.reshape(batch, length, inner))


class Pix2StructMlp(nn.Module):
  """T5 gated MLP: wo(act(wi_0 x) · wi_1 x), no biases."""
  config: Pix2StructConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    gate = _bias_free_dense(cfg.mlp_dim, layers.MLP_IN_AXES, "wi_0", cfg)(x)
    linear = _bias_free_dense(cfg.mlp_dim, layers.MLP_IN_AXES, "wi_1", cfg)(x)
    # 'gelu_new' / 'gelu_pytorch_tanh' are the tanh approximation, 'gelu' the exact erf form.
    gate = nn.gelu(gate, approximate=cfg.dense_act_fn != "gelu")
    return _bias_free_dense(cfg.hidden_size, layers.MLP_OUT_AXES, "wo", cfg)(gate * linear)


class Pix2StructLayer(nn.Module):
  """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)). Returns (x, None) for nn.scan."""
  config: Pix2StructConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
    cfg = self.config
    x = x + Pix2StructAttention(cfg, name="attention")(_norm("pre_attention_layer_norm", cfg)(x),
                                                       mask)
    x = x + Pix2StructMlp(cfg, name="mlp")(_norm("pre_mlp_layer_norm", cfg)(x))
    return nn.with_logical_constraint(x, TOKEN_AXES), None


class Pix2StructEncoder(nn.Module):
  """Flattened patches → HF `Pix2StructVisionModel.last_hidden_state`.

  Parameters: patch_projection/{kernel,bias}, row_embedder/embedding,
  column_embedder/embedding, layers/... (stacked on a leading layer axis by nn.scan),
  layernorm/scale.
  """
  config: Pix2StructConfig

  def setup(self):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.patch_projection = layers.dense(cfg.hidden_size, ("conv_in", "vision_embed"),
                                         "patch_projection", dtype, param_dtype)
    table = lambda name: nn.Embed(
        cfg.seq_len, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5),
                                                    ("vision_pos", "vision_embed")))
    self.row_embedder = table("row_embedder")
    self.column_embedder = table("column_embedder")
    layer_cls = Pix2StructLayer
    if cfg.remat:
      # Inside a scan the loop already keeps XLA from CSE-ing the recomputation away.
      layer_cls = nn.remat(layer_cls, prevent_cse=False)
    # One traced body whatever the depth; the mask is the same for every layer.
    self.layers = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast,), length=cfg.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.layernorm = _norm("layernorm", cfg)

  def __call__(self, flattened_patches: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Args:
      flattened_patches: [B, N, 2 + p²·3], rows [row_id, col_id, pixels...] (ids as floats).
      attention_mask: [B, N], nonzero for real patches; None → rows whose values do not
        all sum to zero (HF's default).

    Returns: [B, N, hidden_size].
    """
    cfg = self.config
    if flattened_patches.ndim != 3 or flattened_patches.shape[-1] != 2 + cfg.patch_dim:
      raise ValueError(f"Pix2StructEncoder: expected flattened patches [B, N, {2 + cfg.patch_dim}]"
                       f" (2 ids + {cfg.patch_dim} pixel values), got {flattened_patches.shape}")
    if attention_mask is None:
      attention_mask = jnp.sum(flattened_patches, axis=-1) != 0
    # Ids are stored as floats; torch's .long() truncates, so does astype.
    row_ids = flattened_patches[..., 0].astype(jnp.int32)
    col_ids = flattened_patches[..., 1].astype(jnp.int32)
    return self.encode(flattened_patches[..., 2:], row_ids, col_ids, attention_mask)

  def encode(self, patches: jax.Array, row_ids: jax.Array, col_ids: jax.Array,
             attention_mask: jax.Array | None = None) -> jax.Array:
    """patches [B, N, p²·3]; row_ids, col_ids [B, N] or [N] int; mask [B, N] (None: all real)."""
    x = self.patch_projection(patches.astype(jnp.dtype(self.config.dtype)))
    x = x + self.row_embedder(row_ids) + self.column_embedder(col_ids)
    x = nn.with_logical_constraint(x, TOKEN_AXES)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    x, _ = self.layers(x, mask)
    return self.layernorm(x)


class Pix2StructTower(nn.Module):
  """LEO-MINI expert: square [0, 1] image → last hidden states of its patch grid.

  Parameters are those of `Pix2StructEncoder` (shared scope, same tree).
  """
  config: Pix2StructConfig

  def setup(self):
    self.encoder = Pix2StructEncoder(self.config)
    nn.share_scope(self, self.encoder)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Args: pixels [B, S, S, 3] in [0, 1] (S = image_size).

    Returns: [B, grid_side², hidden_size], row-major over the patch grid.
    """
    cfg = self.config
    if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"Pix2StructTower: expected pixels [B, {cfg.image_size}, {cfg.image_size}, "
                       f"3] (image_size), got {pixels.shape}")
    patches, row_ids, col_ids = image_patches(pixels, cfg.patch_size, cfg.output_grid)
    return self.encoder.encode(patches, row_ids, col_ids)
