"""EVA-02 detection backbone: shapes, block grouping, rotary tables, axes, bf16, remat, scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models.vision.eva02 import (EVA02_L_WINDOW_BLOCKS, Eva02Config, Eva02Tower,
                                              rope_tables, window_partition,
                                              window_unpartition)
from tests.models.vision import tower_params


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


# Grid 6 with window 4 (padded windows); position table for 5×5 plus class slot; blocks
# window, global, window, global: two scanned groups of two.
TINY = Eva02Config(image_size=96, patch_size=16, hidden_size=32, intermediate_size=48,
                   num_layers=4, num_heads=2, window_size=4, window_block_indexes=(0, 2),
                   pretrain_grid=5, rope_pretrain_grid=3)


def random_params(config, seed=0):
  return tower_params.noise_params(Eva02Tower(config), jnp.zeros((1, config.image_size, config.image_size, 3)), seed,
                                   scale=0.1)


def unstack(params, config):
  """Scanned layout (blocks/block_j [groups, ...]) → unrolled (blocks_{group·k + j})."""
  period = config.block_period
  out = {k: v for k, v in params.items() if k != "blocks"}
  for j in range(period):
    for g in range(config.num_layers // period):
      out[f"blocks_{g * period + j}"] = jax.tree_util.tree_map(
          lambda a, g=g: a[g], params["blocks"][f"block_{j}"])
  return out


def pixels(config, batch=2, seed=1):
  size = config.image_size
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)),
                     jnp.float32)


def test_defaults_are_eva02_large():
  cfg = Eva02Config()
  assert cfg.window_block_indexes == EVA02_L_WINDOW_BLOCKS
  assert [i for i in range(24) if not cfg.windowed[i]] == list(range(2, 24, 3))
  assert (cfg.input_size, cfg.output_grid, cfg.feature_dim, cfg.block_period) == \
      (1024, (64, 64), 1024, 3)
  assert cfg.intermediate_size == int(1024 * 4 * 2 / 3)
  assert cfg.mean == (0.48145466, 0.4578275, 0.40821073)   # EAGLE's processor statistics
  out = jax.eval_shape(lambda x: Eva02Tower(cfg).init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32))
  assert out.shape == (1, 4096, 1024)


@pytest.mark.parametrize("windows, period", [((0, 1, 3, 4), 3), ((), 1), ((0, 1, 2, 3, 4, 5), 1),
                                             ((0, 2, 3), 6), ((0, 2, 4), 2)])
def test_block_period(windows, period):
  cfg = Eva02Config(num_layers=6, window_block_indexes=windows)
  assert cfg.block_period == period


def test_shapes_and_scanned_layout():
  params = random_params(TINY)
  block = params["blocks"]["block_0"]
  assert set(params["blocks"]) == {"block_0", "block_1"} and TINY.block_period == 2
  assert block["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  assert "bias" not in block["attn"]["k_proj"] and block["attn"]["q_bias"].shape == (2, 32)
  assert block["mlp"]["ffn_ln"]["scale"].shape == (2, 48)
  assert params["pos_embed"].shape == (26, 32)
  out = jax.jit(Eva02Tower(TINY).apply)({"params": params}, pixels(TINY))
  assert out.shape == (2, 36, 32) and bool(jnp.all(jnp.isfinite(out)))


def test_every_parameter_has_logical_axes():
  variables = jax.eval_shape(lambda: Eva02Tower(TINY).init(jax.random.key(0),
                                                          pixels(TINY, batch=1)))
  leaves = jax.tree_util.tree_leaves_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)


def test_scan_equals_unrolled():
  params = random_params(TINY)
  x = pixels(TINY)
  apply = lambda cfg, p: jax.jit(Eva02Tower(cfg).apply)({"params": p}, x)
  flat = Eva02Config(**{**TINY.__dict__, "scan_layers": False})
  np.testing.assert_allclose(np.asarray(apply(TINY, params)),
                             np.asarray(apply(flat, unstack(params, TINY))), atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_values_and_gradients():
  params = random_params(TINY)
  x = pixels(TINY)

  def loss(p, cfg):
    return jnp.mean(Eva02Tower(cfg).apply({"params": p}, x) ** 2)
  remat = Eva02Config(**{**TINY.__dict__, "remat": True})
  base, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, TINY)
  again, grads_remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
  np.testing.assert_allclose(float(again), float(base), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bfloat16_runs_and_is_close():
  params = random_params(TINY)
  x = pixels(TINY)
  ref = np.asarray(jax.jit(Eva02Tower(TINY).apply)({"params": params}, x))
  bf16 = Eva02Config(**{**TINY.__dict__, "dtype": "bfloat16"})
  out = jax.jit(Eva02Tower(bf16).apply)({"params": params}, x)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def test_window_partition_pads_and_round_trips():
  x = jnp.arange(2 * 6 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 6, 3)
  windows, padded = window_partition(x, 4)
  assert windows.shape == (2 * 4, 16, 3) and padded == (8, 8)
  # Window (0, 1) of image 0 holds columns 4-5 of rows 0-3, then zero padding.
  np.testing.assert_array_equal(np.asarray(windows[1]).reshape(4, 4, 3)[:, :2], x[0, :4, 4:])
  assert float(jnp.abs(windows[1].reshape(4, 4, 3)[:, 2:]).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(window_unpartition(windows, 4, padded, (6, 6))), x)


def test_rope_tables_rows_then_columns():
  cos, sin = rope_tables(side=4, pretrain_grid=8, head_dim=16)
  assert cos.shape == sin.shape == (16, 16)
  freqs = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)          # head_dim/2 = 8 per axis
  r, c = 3, 1                                              # token 3·4 + 1
  angles = np.concatenate([np.repeat(r * 2 * freqs, 2), np.repeat(c * 2 * freqs, 2)])
  np.testing.assert_allclose(cos[r * 4 + c], np.cos(angles), atol=1e-6)
  np.testing.assert_allclose(sin[r * 4 + c], np.sin(angles), atol=1e-6)


def test_bad_configs_and_inputs():
  with pytest.raises(ValueError, match="window_block_indexes"):
    Eva02Config(num_layers=6)                     # EVA-02-L's indexes reach block 22
  with pytest.raises(ValueError, match="head_dim"):
    Eva02Config(hidden_size=36, num_heads=6)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    Eva02Config(image_size=1000)
  with pytest.raises(ValueError, match="square"):
    Eva02Tower(TINY).init(jax.random.key(0), jnp.zeros((1, 96, 64, 3)))


def test_registered_as_a_vision_expert():
  from leo_mini_jax.models.vision import experts
  fields = {f: getattr(TINY, f) for f in ("image_size", "hidden_size", "intermediate_size",
                                          "num_layers", "num_heads", "window_size",
                                          "window_block_indexes", "pretrain_grid",
                                          "rope_pretrain_grid")}
  module, info = experts.build_expert("eva02", dict(name="eva02", **fields))
  assert (info.input_size, info.output_grid, info.feature_dim) == (96, (6, 6), 32)
  images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.uint8)   # master resolution
  out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], images)
  assert out.shape == (2, 36, 32)
  _, paper = experts.build_expert("eva02", dict(name="eva02"))
  assert (paper.num_tokens, paper.feature_dim) == (4096, 1024)
