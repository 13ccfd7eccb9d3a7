"""CLIP vision tower: shapes, class-token modes, position interpolation, NumPy reference."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from leo_mini_jax.models.vision.clip import ClipConfig, ClipVisionTower
from leo_mini_jax.models.vision.positions import interpolate_patch_positions, torch_bicubic_matrix
from tests.models.vision import tower_params


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


TINY = ClipConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4)


def random_params(config, seed=0):
  return tower_params.noise_params(ClipVisionTower(config), jnp.zeros((1, config.image_size, config.image_size, 3)), seed,
                                   scale=0.3)


# ---------------------------------------------------------------- NumPy references

def reference_bicubic(grid, out_h, out_w, a=-0.75):
  """torch upsample_bicubic2d (align_corners=False, size given), one output at a time."""
  in_h, in_w, _ = grid.shape

  def kernel(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
      return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0

  out = np.zeros((out_h, out_w, grid.shape[-1]))
  for i in range(out_h):
    sy = (i + 0.5) * in_h / out_h - 0.5
    y0 = math.floor(sy)
    for j in range(out_w):
      sx = (j + 0.5) * in_w / out_w - 0.5
      x0 = math.floor(sx)
      for m in range(-1, 3):
        for n in range(-1, 3):
          weight = kernel(y0 + m - sy) * kernel(x0 + n - sx)
          yy, xx = min(max(y0 + m, 0), in_h - 1), min(max(x0 + n, 0), in_w - 1)
          out[i, j] += weight * grid[yy, xx]
  return out


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def reference_clip(params, pixels, cfg):
  """float64 CLIP forward written from the HF description (both class-token modes)."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  pixels = np.asarray(pixels, np.float64)
  batch, height, width, _ = pixels.shape
  p, dim = cfg.patch_size, cfg.hidden_size
  gh, gw = height // p, width // p
  patches = pixels.reshape(batch, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(batch, gh * gw, p * p * 3) @ params["patch_embedding"]["kernel"].reshape(
      p * p * 3, dim)
  pos = params["position_embedding"]
  side = cfg.pretrained_grid
  patch_pos = reference_bicubic(pos[1:].reshape(side, side, dim), gh, gw).reshape(gh * gw, dim)
  x = x + patch_pos
  if cfg.cls_token == "keep":
    cls = np.broadcast_to(params["class_embedding"] + pos[0], (batch, 1, dim))
    x = np.concatenate([cls, x], axis=1)
  x = np_layer_norm(x, params["pre_layernorm"], cfg.layer_norm_eps)
  heads, head_dim = cfg.num_heads, dim // cfg.num_heads
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda a, i=i: a[i], params["layers"])  # scanned: stacked on axis 0
    h = np_layer_norm(x, layer["layer_norm1"], cfg.layer_norm_eps)
    att = layer["self_attn"]
    split = lambda t: t.reshape(batch, -1, heads, head_dim).transpose(0, 2, 1, 3)
    q, k, v = (split(np_dense(h, att[n])) for n in ("q_proj", "k_proj", "v_proj"))
    logits = q @ k.transpose(0, 1, 3, 2) * head_dim ** -0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
    x = x + np_dense(o, att["out_proj"])
    h = np_dense(np_layer_norm(x, layer["layer_norm2"], cfg.layer_norm_eps), layer["mlp"]["fc1"])
    if cfg.hidden_act == "quick_gelu":
      h = h / (1 + np.exp(-1.702 * h))
    else:
      h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = x + np_dense(h, layer["mlp"]["fc2"])
  return x[:, 1:] if cfg.cls_token == "keep" else x


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("cls_token", ["drop", "keep"])
@pytest.mark.parametrize("image_size", [32, 48])
def test_output_shape(cls_token, image_size):
  cfg = dataclasses.replace(TINY, cls_token=cls_token, image_size=image_size)
  pixels = jnp.zeros((2, image_size, image_size, 3))
  # Shapes only: traced, not run (the parity tests run the tower).
  out = jax.eval_shape(lambda p, x: ClipVisionTower(cfg).apply({"params": p}, x),
                       random_params(TINY), pixels)
  grid = image_size // 8
  assert out.shape == (2, grid * grid, 32)
  assert cfg.output_grid == (grid, grid) and cfg.feature_dim == 32


def test_pretrained_image_size_survives_replace():
  cfg = dataclasses.replace(TINY, image_size=48)
  assert cfg.pretrained_image_size == 32 and cfg.pretrained_grid == 4
  assert ClipConfig(image_size=448).pretrained_image_size == 448


def test_parameters_identical_in_both_modes():
  shapes = {}
  for mode in ("drop", "keep"):
    cfg = dataclasses.replace(TINY, cls_token=mode)
    variables = jax.eval_shape(ClipVisionTower(cfg).init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    shapes[mode] = jax.tree.map(lambda a: a.shape, nn.meta.unbox(variables["params"]))
  assert shapes["drop"] == shapes["keep"]
  assert shapes["drop"]["class_embedding"] == (32,)
  assert shapes["drop"]["position_embedding"] == (17, 32)


@pytest.mark.parametrize("cls_token", ["drop", "keep"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("image_size", [32, 40])
def test_matches_numpy_reference(cls_token, hidden_act, image_size):
  cfg = dataclasses.replace(TINY, cls_token=cls_token, hidden_act=hidden_act,
                            image_size=image_size)
  params = random_params(TINY, seed=1)
  pixels = np.random.default_rng(2).standard_normal((2, image_size, image_size, 3))
  out = ClipVisionTower(cfg).apply({"params": params}, jnp.asarray(pixels, jnp.float32))
  expected = reference_clip(params, pixels, cfg)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_drop_and_keep_differ():
  params = random_params(TINY, seed=3)
  pixels = jnp.asarray(np.random.default_rng(4).standard_normal((1, 32, 32, 3)), jnp.float32)
  drop = ClipVisionTower(TINY).apply({"params": params}, pixels)
  keep = ClipVisionTower(dataclasses.replace(TINY, cls_token="keep")).apply(
      {"params": params}, pixels)
  assert drop.shape == keep.shape
  assert np.abs(np.asarray(drop) - np.asarray(keep)).max() > 1e-2


def test_interpolation_is_identity_at_pretrained_size():
  pos = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(interpolate_patch_positions(jnp.asarray(pos), (4, 4))),
                                pos)
  np.testing.assert_allclose(torch_bicubic_matrix(4, 4), np.eye(4), atol=1e-7)


@pytest.mark.parametrize("new_grid", [(7, 7), (3, 3), (6, 9), (24, 24)])
def test_interpolation_matches_loop_reference(new_grid):
  pos = np.random.default_rng(6).standard_normal((25, 6))
  out = interpolate_patch_positions(jnp.asarray(pos, jnp.float32), new_grid)
  expected = reference_bicubic(pos.reshape(5, 5, 6), *new_grid).reshape(-1, 6)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


@pytest.mark.parametrize("new_grid", [(7, 7), (3, 3), (6, 9), (32, 32)])
def test_interpolation_matches_torch(new_grid):
  torch = pytest.importorskip("torch")
  pos = np.random.default_rng(7).standard_normal((24 * 24, 16)).astype(np.float32)
  grid = torch.from_numpy(pos).reshape(1, 24, 24, 16).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(grid, size=new_grid, mode="bicubic",
                                             align_corners=False)
  expected = expected.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
  out = interpolate_patch_positions(jnp.asarray(pos), new_grid)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="ClipConfig: unknown field"):
    ClipConfig.from_config({"image_size": 32, "patch": 8})
  with pytest.raises(ValueError, match="hidden_act"):
    ClipConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="cls_token"):
    ClipConfig(cls_token="first")
  with pytest.raises(ValueError, match="multiple of patch_size"):
    ClipConfig(image_size=100, patch_size=14)
  cfg = ClipConfig.from_config({"image_size": 32, "patch_size": 8, "mean": [0.5, 0.5, 0.5]})
  assert cfg.mean == (0.5, 0.5, 0.5) and hash(cfg)


def test_logical_axis_names():
  variables = jax.eval_shape(ClipVisionTower(TINY).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  names = jax.tree.map(lambda p: p.names, variables["params"],
                       is_leaf=lambda p: isinstance(p, nn.Partitioned))
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda p: isinstance(p, nn.Partitioned))
  assert all(isinstance(p, nn.Partitioned) for p in leaves)
  assert names["position_embedding"] == ("vision_pos", "vision_embed")
  assert names["layers"]["mlp"]["fc1"]["kernel"] == ("layers", "vision_embed", "vision_mlp")
  assert names["patch_embedding"]["kernel"] == ("conv_height", "conv_width", "conv_in",
                                                "vision_embed")


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
  def program(num_layers):
    cfg = dataclasses.replace(TINY, num_layers=num_layers)
    params = jax.eval_shape(ClipVisionTower(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    assert nn.meta.unbox(params)["layers"]["mlp"]["fc2"]["bias"].shape == (num_layers, 32)
    fn = lambda p, x: ClipVisionTower(cfg).apply({"params": p}, x)
    return str(jax.make_jaxpr(fn)(nn.meta.unbox(params), jnp.zeros((1, 32, 32, 3))))
  two, six = program(2), program(6)
  assert len(six) < len(two) * 1.05  # unrolled, six layers would be ~3× the text


def test_bfloat16_close_to_float32_and_remat_same_gradients():
  params = random_params(TINY, seed=8)
  pixels = jnp.asarray(np.random.default_rng(9).standard_normal((1, 40, 40, 3)), jnp.float32)
  cfg = dataclasses.replace(TINY, image_size=40)
  reference = ClipVisionTower(cfg).apply({"params": params}, pixels)
  low = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
  params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  out = jax.jit(ClipVisionTower(low).apply)({"params": params_bf16}, pixels)
  assert out.dtype == jnp.bfloat16
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(out.astype(jnp.float32) - reference).max()) < 0.05 * scale
  loss = lambda cfg: lambda p: ClipVisionTower(cfg).apply({"params": p}, pixels).sum()
  grads = jax.jit(jax.grad(loss(dataclasses.replace(cfg, remat=True))))(params)
  expected = jax.jit(jax.grad(loss(cfg)))(params)
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)
