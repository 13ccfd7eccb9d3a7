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
