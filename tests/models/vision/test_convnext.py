"""ConvNeXt tower: shapes, parameter layout and a float64 NumPy reference forward."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from leo_mini_jax.models.vision.convnext import ConvNextConfig, ConvNextTower
from tests.models.vision import tower_params


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


TINY = ConvNextConfig(image_size=64, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))


def random_params(config, seed=0):
  return tower_params.noise_params(ConvNextTower(config), jnp.zeros((1, config.image_size, config.image_size, 3)), seed,
                                   scale=0.2)


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_patch_conv(x, p, k):
  """k×k stride-k conv without padding, HWIO kernel, as patches @ flattened kernel."""
  batch, height, width, channels = x.shape
  gh, gw = height // k, width // k
  x = x[:, :gh * k, :gw * k].reshape(batch, gh, k, gw, k, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, gh, gw, k * k * channels) @ p["kernel"].reshape(k * k * channels, -1) \
      + p["bias"]


def np_depthwise_conv(x, p):
  """'same' depthwise conv: a sum of shifted copies weighted per channel."""
  k = p["kernel"].shape[0]
  pad = k // 2
  _, height, width, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros_like(x)
  for dy in range(k):
    for dx in range(k):
      out += padded[:, dy:dy + height, dx:dx + width] * p["kernel"][dy, dx, 0]
  return out + p["bias"]


def reference_convnext(params, pixels, cfg):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  eps = cfg.layer_norm_eps
  x = np_patch_conv(np.asarray(pixels, np.float64), params["stem"]["conv"], cfg.patch_size)
  x = np_layer_norm(x, params["stem"]["norm"], eps)
  for s, depth in enumerate(cfg.depths):
    stage = params[f"stages_{s}"]
    if s > 0:
      x = np_patch_conv(np_layer_norm(x, stage["downsample"]["norm"], eps),
                        stage["downsample"]["conv"], 2)
    for b in range(depth):
      block = jax.tree.map(lambda a, b=b: a[b], stage["blocks"])  # scanned: stacked on axis 0
      h = np_layer_norm(np_depthwise_conv(x, block["conv_dw"]), block["norm"], eps)
      h = h @ block["fc1"]["kernel"] + block["fc1"]["bias"]
      h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
      h = h @ block["fc2"]["kernel"] + block["fc2"]["bias"]
      x = x + h * block["gamma"]
  return x.reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize("image_size", [64, 96])
def test_output_shape(image_size):
  cfg = dataclasses.replace(TINY, image_size=image_size)
  # Shapes only: traced, not run (the parity tests run the tower).
  out = jax.eval_shape(lambda p, x: ConvNextTower(cfg).apply({"params": p}, x),
                       random_params(TINY), jnp.zeros((2, image_size, image_size, 3)))
  side = image_size // 32
  assert out.shape == (2, side * side, 64)
  assert cfg.output_grid == (side, side) and cfg.feature_dim == 64


def test_parameter_layout():
  params = random_params(TINY)
  assert "downsample" not in params["stages_0"]
  assert params["stem"]["conv"]["kernel"].shape == (4, 4, 3, 8)
  assert params["stages_1"]["downsample"]["conv"]["kernel"].shape == (2, 2, 8, 16)
  assert params["stages_1"]["downsample"]["norm"]["scale"].shape == (8,)
  # Blocks are scanned: each stage stacks its blocks' parameters on a leading axis.
  depth = TINY.depths[2]
  block = params["stages_2"]["blocks"]
  assert block["conv_dw"]["kernel"].shape == (depth, 7, 7, 1, 32)
  assert block["fc1"]["kernel"].shape == (depth, 32, 128)
  assert block["gamma"].shape == (depth, 32)
  no_ls = dataclasses.replace(TINY, ls_init_value=None)
  shapes = jax.eval_shape(ConvNextTower(no_ls).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert "gamma" not in shapes["params"]["stages_0"]["blocks"]
  names = jax.tree.map(lambda p: p.names, shapes["params"],
                       is_leaf=lambda p: isinstance(p, nn.Partitioned))
  assert names["stages_1"]["blocks"]["fc1"]["kernel"] == ("layers", "vision_embed", "vision_mlp")


@pytest.mark.parametrize("image_size", [64, 70])
def test_matches_numpy_reference(image_size):
  cfg = dataclasses.replace(TINY, image_size=image_size)
  params = random_params(TINY, seed=1)
  pixels = np.random.default_rng(2).standard_normal((2, image_size, image_size, 3))
  out = ConvNextTower(cfg).apply({"params": params}, jnp.asarray(pixels, jnp.float32))
  expected = reference_convnext(params, pixels, cfg)
  assert out.shape == expected.shape
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_defaults_are_convnext_xxlarge():
  cfg = ConvNextConfig()
  assert cfg.depths == (3, 4, 30, 3) and cfg.dims == (384, 768, 1536, 3072)
  assert cfg.layer_norm_eps == 1e-5 and cfg.output_grid == (32, 32) and cfg.feature_dim == 3072
  variables = jax.eval_shape(ConvNextTower(cfg).init, jax.random.key(0),
                             jnp.zeros((1, 64, 64, 3)))
  count = sum(np.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(variables["params"])))
  # timm convnext_xxlarge without its classifier head (head.norm): 843,391,872 parameters.
  assert count == 843_391_872, count


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="ConvNextConfig: unknown field"):
    ConvNextConfig.from_config({"dims": [8, 16], "depths": [1, 1], "width": 3})
  with pytest.raises(ValueError, match="same, non-zero length"):
    ConvNextConfig(dims=(8, 16), depths=(1,))
  cfg = ConvNextConfig.from_config({"dims": [8, 16], "depths": [1, 1], "image_size": 32})
  assert cfg.dims == (8, 16) and cfg.output_grid == (4, 4)


def test_bfloat16_close_to_float32():
  params = random_params(TINY, seed=8)
  pixels = jnp.asarray(np.random.default_rng(9).standard_normal((1, 64, 64, 3)), jnp.float32)
  reference = ConvNextTower(TINY).apply({"params": params}, pixels)
  low = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
  params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  # jit: op-by-op bfloat16 convs crawl on CPU.
  out = jax.jit(ConvNextTower(low).apply)({"params": params_bf16}, pixels)
  assert out.dtype == jnp.bfloat16
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(out.astype(jnp.float32) - reference).max()) < 0.05 * scale


@pytest.mark.parametrize("shape,kernel", [((2, 9, 7, 5), 7), ((1, 4, 6, 3), 3), ((2, 2, 3, 4), 7)])
def test_depthwise_conv_and_its_gradients_match_the_grouped_conv(shape, kernel):
  from leo_mini_jax.models.vision.convnext import depthwise_conv
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, shape[-1])), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  pad = kernel // 2
  grouped = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=shape[-1], precision="highest")
  want, want_vjp = jax.vjp(grouped, x, w)
  got, got_vjp = jax.vjp(depthwise_conv, x, w)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
