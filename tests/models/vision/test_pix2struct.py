"""Pix2Struct vision encoder: shapes, patch building, NumPy reference, padding, bf16, remat."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models.vision import pix2struct as p2s
from leo_mini_jax.models.vision.experts import build_expert, registered_experts
from tests.models.vision import tower_params


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


# head_dim·num_heads (24) ≠ hidden_size (32), as HF's d_kv allows; max_patches 27 gives a
# 5×5 grid of 4-px patches: the 20-px image as it is, a 32-px one resized to 20 px.
TINY = p2s.Pix2StructConfig(hidden_size=32, num_layers=2, num_heads=4, head_dim=6, mlp_dim=40,
                            patch_size=4, seq_len=12, max_patches=27, image_size=20)
TINY_RESIZED = dataclasses.replace(TINY, image_size=32)


def random_params(config, seed=0):
  return tower_params.noise_params(p2s.Pix2StructTower(config), jnp.zeros((1, config.input_size, config.input_size, 3)), seed,
                                   scale=0.3)


def apply(module, params, *args):
  """module.apply under jit: one compile instead of op-by-op dispatch (much faster on CPU)."""
  return jax.jit(module.apply)({"params": params}, *args)


def images(config, batch=2, seed=1):
  size = config.input_size
  return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------- NumPy references

def np_rms(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_encoder(params, fp, mask, cfg, act=np_gelu_tanh):
  """float64 Pix2StructVisionModel forward written from HF's modeling file."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  fp = np.asarray(fp, np.float64)
  rows, cols = fp[..., 0].astype(int), fp[..., 1].astype(int)
  proj = params["patch_projection"]
  x = fp[..., 2:] @ proj["kernel"] + proj["bias"]
  x = x + params["row_embedder"]["embedding"][rows] + params["column_embedder"]["embedding"][cols]
  batch, length, _ = x.shape
  bias = np.where(np.asarray(mask)[:, None, None, :] > 0, 0.0, -np.inf)
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda a, i=i: a[i], params["layers"])  # scanned: stacked on axis 0
    att = layer["attention"]
    h = np_rms(x, layer["pre_attention_layer_norm"]["scale"], cfg.layer_norm_eps)
    split = lambda t: t.reshape(batch, length, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    q, k, v = (split(h @ att[n]["kernel"]) for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) + bias  # T5: no 1/√d scaling
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = x + o @ att["output"]["kernel"]
    h = np_rms(x, layer["pre_mlp_layer_norm"]["scale"], cfg.layer_norm_eps)
    mlp = layer["mlp"]
    x = x + (act(h @ mlp["wi_0"]["kernel"]) * (h @ mlp["wi_1"]["kernel"])) @ \
        mlp["wo"]["kernel"]
  return np_rms(x, params["layernorm"]["scale"], cfg.layer_norm_eps)


def reference_patches(pixels, p):
  """The numpy processor's normalize + torch_extract_patches, one image at a time (no resize)."""
  out = []
  for image in np.asarray(pixels, np.float64) * 255.0:
    h, w, c = image.shape
    image = (image - image.mean()) / max(image.std(), 1 / math.sqrt(h * w * c))
    rows = []
    for r in range(h // p):
      for q in range(w // p):
        rows.append(np.concatenate([[r + 1, q + 1], image[r * p:(r + 1) * p,
                                                          q * p:(q + 1) * p].reshape(-1)]))
    out.append(np.stack(rows))
  return np.stack(out)


# ---------------------------------------------------------------- tests

def test_config_sizes():
  full = p2s.Pix2StructConfig()
  assert (full.input_size, full.grid_side, full.resized_size, full.output_grid,
          full.feature_dim, full.patch_dim) == (1024, 45, 720, (45, 45), 1536, 768)
  assert (TINY.input_size, TINY.resized_size, TINY.output_grid) == (20, 20, (5, 5))
  assert (TINY_RESIZED.input_size, TINY_RESIZED.resized_size) == (32, 20)


@pytest.mark.parametrize("size", [224, 336, 512, 720, 1000, 1024, 2048])
def test_2048_patches_give_45x45_for_any_square_image(size):
  assert p2s.processor_grid(size, size, 2048, 16) == (45, 45)
  assert p2s.Pix2StructConfig(image_size=size).output_grid == (45, 45)
  # A non-square image keeps its aspect within the budget.
  rows, cols = p2s.processor_grid(size, 2 * size, 2048, 16)
  assert rows * cols <= 2048 and (rows, cols) == (32, 64)


def test_tower_and_encoder_shapes_and_sharing():
  params = random_params(TINY)
  x = jnp.asarray(images(TINY))
  out = apply(p2s.Pix2StructTower(TINY), params, x)
  assert out.shape == (2, 25, 32)
  fp = p2s.flattened_patches(x, TINY.patch_size)
  assert fp.shape == (2, 25, 2 + 48)
  enc = apply(p2s.Pix2StructEncoder(TINY), params, fp, jnp.ones((2, 25)))
  np.testing.assert_allclose(np.asarray(enc), np.asarray(out), atol=3e-5)
  enc_shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(jax.eval_shape(
      p2s.Pix2StructEncoder(TINY).init, jax.random.key(0), fp)["params"]))
  assert enc_shapes == jax.tree.map(lambda a: a.shape, params)


def test_tower_standardises_then_resizes():
  params = random_params(TINY, seed=12)
  x = jnp.asarray(images(TINY_RESIZED, seed=13))
  out = apply(p2s.Pix2StructTower(TINY_RESIZED), params, x)
  fp = p2s.flattened_patches(x, 4, (5, 5))
  np.testing.assert_allclose(np.asarray(apply(p2s.Pix2StructEncoder(TINY), params, fp)),
                             np.asarray(out), atol=3e-5)
  # Statistics of the 32-px image, not of its 20-px resize.
  scaled = np.asarray(x, np.float64) * 255
  axes = dict(axis=(1, 2, 3), keepdims=True)
  standardised = (scaled - scaled.mean(**axes)) / scaled.std(**axes)
  resized = jax.image.resize(jnp.asarray(standardised, jnp.float32), (2, 20, 20, 3), "bilinear",
                             antialias=True)
  np.testing.assert_allclose(np.asarray(p2s.image_patches(x, 4, (5, 5))[0]),
                             _patchify(resized, 4), atol=1e-4)


def test_patches_match_numpy_processor():
  x = images(TINY, seed=3)
  fp = p2s.flattened_patches(jnp.asarray(x), TINY.patch_size)
  np.testing.assert_allclose(np.asarray(fp), reference_patches(x, TINY.patch_size), atol=2e-5)


def test_near_constant_image_hits_the_std_floor():
  x = np.full((1, 20, 20, 3), 0.5, np.float32)
  x[0, 0, 0, 0] += 1e-3
  std = float(np.asarray(x, np.float64).std() * 255)
  assert std < 1 / math.sqrt(20 * 20 * 3)  # so the floor is what divides
  patches, _, _ = p2s.image_patches(jnp.asarray(x), 4)
  np.testing.assert_allclose(np.asarray(patches), reference_patches(x, 4)[..., 2:], atol=1e-4)
  # (0.255 − mean) / (1/√1200), not / std (which would give ≈ 34.6)
  np.testing.assert_allclose(float(patches[0, 0, 0]), 0.255 * (1 - 1 / 1200) * math.sqrt(1200),
                             rtol=1e-3)


def _patchify(x, p):
  b, h, w, c = x.shape
  return np.asarray(x).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (h // p) * (w // p), p * p * c)


def test_ids_are_one_based_row_major():
  _, rows, cols = p2s.image_patches(jnp.zeros((1, 8, 12, 3)), 4)
  np.testing.assert_array_equal(np.asarray(rows), [1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(np.asarray(cols), [1, 2, 3, 1, 2, 3])


@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_encoder_matches_numpy_reference_with_padding_rows(act):
  cfg = dataclasses.replace(TINY, dense_act_fn=act)
  params = random_params(cfg, seed=1)
  x = images(cfg, seed=2)
  fp = np.asarray(p2s.flattened_patches(jnp.asarray(x), cfg.patch_size))
  # The processor pads with all-zero rows; the second image has 7 of them.
  fp = np.concatenate([fp, np.zeros((2, 3, fp.shape[-1]), np.float32)], axis=1)
  fp[1, -10:] = 0.0
  mask = (fp.sum(-1) != 0).astype(np.float32)
  assert mask[0].sum() == 25 and mask[1].sum() == 18
  out = apply(p2s.Pix2StructEncoder(cfg), params, jnp.asarray(fp), jnp.asarray(mask))
  if act == "gelu":
    erf = pytest.importorskip("scipy.special").erf
    expected = reference_encoder(params, fp, mask, cfg,
                                 act=lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2))))
  else:
    expected = reference_encoder(params, fp, mask, cfg)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)
  # The default mask (rows summing to non-zero) is the same mask.
  default = apply(p2s.Pix2StructEncoder(cfg), params, jnp.asarray(fp))
  np.testing.assert_allclose(np.asarray(default), np.asarray(out), atol=3e-5)


def test_padding_rows_do_not_change_real_outputs():
  params = random_params(TINY, seed=4)
  x = jnp.asarray(images(TINY, seed=5))
  tower = apply(p2s.Pix2StructTower(TINY), params, x)
  fp = p2s.flattened_patches(x, TINY.patch_size)
  padded = jnp.concatenate([fp, jnp.zeros((2, 2, fp.shape[-1]))], axis=1)  # 25 → 27 = max
  out = apply(p2s.Pix2StructEncoder(TINY), params, padded)
  np.testing.assert_allclose(np.asarray(out[:, :25]), np.asarray(tower), atol=3e-5)


def test_logical_axes_on_every_parameter():
  boxed = jax.eval_shape(p2s.Pix2StructTower(TINY).init, jax.random.key(0),
                         jnp.zeros((1, 20, 20, 3)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape) and all(leaf.names)
  names = {tuple(v.names) for v in leaves}
  assert ("layers", "vision_embed", "vision_heads") in names
  assert ("vision_pos", "vision_embed") in names


def test_bfloat16_runs_close_to_float32():
  params = random_params(TINY, seed=6)
  x = jnp.asarray(images(TINY, seed=7))
  f32 = apply(p2s.Pix2StructTower(TINY), params, x)
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  bf16 = apply(p2s.Pix2StructTower(cfg), params, x)
  assert bf16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32))
  assert np.isfinite(err).all() and err.mean() < 0.05 * np.abs(np.asarray(f32)).mean()


def test_remat_gives_same_values_and_gradients():
  params = random_params(TINY, seed=8)
  x = jnp.asarray(images(TINY, seed=9))

  def loss(p, cfg):
    return jnp.sum(apply(p2s.Pix2StructTower(cfg), p, x) ** 2)
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain = grad(params, TINY)
  remat = grad(params, dataclasses.replace(TINY, remat=True))
  np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
    # Recomputation may fuse differently: float32 rounding, relative to the gradient's scale.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(b).max())


def test_registered_expert_runs_on_uint8_master_images():
  assert "pix2struct" in registered_experts()
  fields = dict(name="pix2struct", hidden_size=32, num_layers=2, num_heads=4, head_dim=6,
                mlp_dim=40, patch_size=4, seq_len=12, max_patches=27, image_size=20)
  module, info = build_expert("pix2struct", fields)
  assert (info.input_size, info.output_grid, info.feature_dim, info.num_tokens) == \
      (20, (5, 5), 32, 25)
  assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)
  master = np.random.default_rng(10).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
  params = random_params(TINY, seed=11)
  out = apply(module, params, jnp.asarray(master))
  direct = apply(p2s.Pix2StructTower(TINY), params, jnp.asarray(master, jnp.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(direct), atol=3e-5)
  bigger = apply(module, params, jnp.zeros((1, 64, 64, 3), jnp.uint8))
  assert bigger.shape == (1, 25, 32)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="dense_act_fn"):
    p2s.Pix2StructConfig(dense_act_fn="relu")
  with pytest.raises(ValueError, match="seq_len"):
    p2s.Pix2StructConfig(seq_len=45)
  with pytest.raises(ValueError, match="unknown field"):
    p2s.Pix2StructConfig.from_config({"hidden": 3})
  params = random_params(TINY)
  with pytest.raises(ValueError, match=r"expected pixels \[B, 20, 20, 3\]"):
    apply(p2s.Pix2StructTower(TINY), params, jnp.zeros((1, 24, 24, 3)))
  with pytest.raises(ValueError, match="flattened patches"):
    apply(p2s.Pix2StructEncoder(TINY), params, jnp.zeros((1, 5, 48)))
