"""Position tables resized exactly as PyTorch resizes them, shared by every vision expert.

Checkpoints store absolute position embeddings for the grid they were pretrained at;
running at another input size resizes the grid the way the reference code does, torch
`F.interpolate(mode='bicubic', align_corners=False, size=(h, w))` (HF CLIP's
`interpolate_pos_encoding`, EVA's and ViTDet's `get_abs_pos`). `jax.image.resize` is not
that kernel (Keys a=−0.5, antialiasing when downscaling), so the torch kernel (a=−0.75,
clamped borders, no antialias) is written out here as two small interpolation matrices.
"""

import jax
import jax.numpy as jnp
import numpy as np


def torch_bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] matrix M with `M @ x` = torch 1-D bicubic resize of x.

  torch `upsample_bicubic2d` with align_corners=False and a given `size`: scale = in/out,
  source coordinate s = scale·(i + 0.5) − 0.5 (not clamped for cubic), taps at
  floor(s) − 1 … floor(s) + 2 with indices clamped to the border, Keys kernel with
  a = −0.75. Index and weight arithmetic is float32 as in torch's CPU kernel. The 2-D
  resize is separable: rows by one matrix, columns by another.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  floor = np.floor(src)
  t = (src - floor).astype(np.float32)
  a = np.float32(a)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  for offset, weight in enumerate(taps):
    cols = np.clip(floor.astype(np.int64) - 1 + offset, 0, in_size - 1)
    np.add.at(matrix, (rows, cols), weight)
  return matrix


def interpolate_patch_positions(patch_pos: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """Bicubic (torch, a=−0.75) resize of square-grid position embeddings.

  Args:
    patch_pos: [g·g, D] patch position embeddings (class position excluded), row-major.
    new_grid: (h, w) target grid.

  Returns:
    [h·w, D] in float32; `patch_pos` itself (as float32) when (h, w) == (g, g).
  """
  num, dim = patch_pos.shape
  side = int(round(num ** 0.5))
  if side * side != num:
    raise ValueError(f"interpolate_patch_positions: {num} positions are not a square grid")
  patch_pos = patch_pos.astype(jnp.float32)
  if tuple(new_grid) == (side, side):
    return patch_pos
  rows = jnp.asarray(torch_bicubic_matrix(side, new_grid[0]))
  cols = jnp.asarray(torch_bicubic_matrix(side, new_grid[1]))
  grid = patch_pos.reshape(side, side, dim)
  # HIGHEST: TPUs would otherwise round these small matmuls through bfloat16.
  out = jnp.einsum("ih,jw,hwd->ijd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(new_grid[0] * new_grid[1], dim)


def torch_bilinear_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """[out_size, in_size] matrix M with `M @ x` = torch 1-D bilinear resize of x (no antialias).

  align_corners=True (EAGLE's image and feature-map resizes): s = i·(in−1)/(out−1);
  False: s = (i + 0.5)·in/out − 0.5 clamped at 0. Taps floor(s) and floor(s)+1 (clamped).
  """
  out_index = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = out_index * scale
  else:
    src = np.maximum((out_index + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = (src - low).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, low), 1 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] → [B, h, w, C] as torch `F.interpolate(mode='bilinear', align_corners=True)`.

  Separable, as two small matmuls (HIGHEST precision: TPUs would otherwise round them
  through bfloat16). Computed in float32.
  """
  _, height, width, _ = x.shape
  if (height, width) == tuple(size):
    return x
  rows = jnp.asarray(torch_bilinear_matrix(height, size[0], True))
  cols = jnp.asarray(torch_bilinear_matrix(width, size[1], True))
  out = jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(x.dtype)
