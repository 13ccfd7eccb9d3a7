"""SAM image-encoder tower: shapes, block groups, logical axes, bf16, remat, registry."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models.vision import experts
from leo_mini_jax.models.vision import sam as sam_lib
from leo_mini_jax.models.vision.sam import SamConfig, SamVisionTower
from tests.models.vision import tower_params


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield


# Grid 6, window 4: the windowed blocks pad 6 → 8. Blocks 1 and 3 are global.
TINY = SamConfig(image_size=48, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=4,
                 num_heads=2, window_size=4, global_attn_indexes=(1, 3), output_channels=4)


def random_params(config, seed=0):
  return tower_params.noise_params(SamVisionTower(config), jnp.zeros((1, config.image_size, config.image_size, 3)), seed,
                                   scale=0.3)


def pixels(config, batch=2, seed=1):
  shape = (batch, config.image_size, config.image_size, 3)
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("neck,tokens,dim", [("hf", 36, 4), ("eagle", 9, 16)])
def test_output_shape(neck, tokens, dim):
  cfg = dataclasses.replace(TINY, neck=neck)
  # Shapes only: traced, not run (the parity tests run the tower).
  out = jax.eval_shape(lambda p, x: SamVisionTower(cfg).apply({"params": p}, x),
                       random_params(cfg), pixels(cfg))
  assert out.shape == (2, tokens, dim)
  assert cfg.output_grid[0] * cfg.output_grid[1] == tokens and cfg.feature_dim == dim


def test_paper_defaults():
  cfg = SamConfig()
  assert (cfg.input_size, cfg.output_grid, cfg.feature_dim) == (1024, (32, 32), 1024)
  assert cfg.block_period == 6
  assert dataclasses.replace(cfg, neck="hf").output_grid == (64, 64)
  assert dataclasses.replace(cfg, neck="hf").feature_dim == 256
  assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("layers,global_blocks,period", [
    (24, (5, 11, 17, 23), 6), (4, (1, 3), 2), (3, (2,), 3), (4, (), 1), (4, (0, 1, 2, 3), 1),
    (6, (2, 3), 6)])
def test_block_period(layers, global_blocks, period):
  cfg = dataclasses.replace(TINY, num_layers=layers, global_attn_indexes=global_blocks)
  assert cfg.block_period == period
  shapes = jax.eval_shape(SamVisionTower(cfg).init, jax.random.key(0), pixels(cfg, 1))
  groups = nn.meta.unbox(shapes["params"])["layers"]
  assert sorted(groups) == [f"blocks_{j}" for j in range(period)]
  for j in range(period):
    table = groups[f"blocks_{j}"]["attn"]["rel_pos_h"]
    side = 6 if j in global_blocks else 4   # grid in global blocks, window otherwise
    assert table.shape == (layers // period, 2 * side - 1, 8)


def test_every_parameter_has_logical_axes():
  for neck in ("hf", "eagle"):
    cfg = dataclasses.replace(TINY, neck=neck)
    variables = jax.eval_shape(SamVisionTower(cfg).init, jax.random.key(0), pixels(cfg, 1))
    leaves = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, leaf in leaves:
      name = jax.tree_util.keystr(path)
      assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
      assert len(leaf.names) == leaf.value.ndim, name
      if "layers" in name:
        assert leaf.names[0] == "layers", name


def test_window_partition_round_trip_with_padding():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 5, 3)), jnp.float32)
  windows, padded = sam_lib.window_partition(x, 4)
  assert windows.shape == (2 * 2 * 2, 4, 4, 3) and padded == (8, 8)
  # Window 1 of image 0 is rows 0-3, columns 4-7 (one real column, three padded).
  np.testing.assert_array_equal(np.asarray(windows[1, :, 0]), np.asarray(x[0, :4, 4]))
  np.testing.assert_array_equal(np.asarray(windows[1, :, 1:]), 0)
  np.testing.assert_array_equal(np.asarray(sam_lib.window_unpartition(windows, 4, padded, (6, 5))),
                                np.asarray(x))


def test_relative_positions_gather():
  table = jnp.arange(5.0)[:, None] * jnp.ones((1, 2))
  out = sam_lib.relative_positions(table, 3)
  np.testing.assert_array_equal(np.asarray(out[..., 0]), [[2, 1, 0], [3, 2, 1], [4, 3, 2]])
  with pytest.raises(ValueError, match="needs 7"):
    sam_lib.relative_positions(table, 4)


def test_relative_positions_change_the_output():
  params = random_params(TINY, seed=3)
  x = pixels(TINY)
  out = SamVisionTower(TINY).apply({"params": params}, x)
  for j in (0, 1):   # a windowed and a global block
    changed = jax.tree.map(lambda a: a, params)
    changed["layers"][f"blocks_{j}"]["attn"]["rel_pos_w"] *= 0
    other = SamVisionTower(TINY).apply({"params": changed}, x)
    assert np.abs(np.asarray(out - other)).max() > 1e-2


@pytest.mark.parametrize("neck", ["hf", "eagle"])
def test_bfloat16_runs_close_to_float32(neck):
  cfg = dataclasses.replace(TINY, neck=neck)
  params, x = random_params(cfg, seed=4), pixels(cfg)
  ref = SamVisionTower(cfg).apply({"params": params}, x)
  out = SamVisionTower(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, x)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
  assert err.max() < 0.1 * np.abs(np.asarray(ref)).max(), err.max()


def test_remat_gives_the_same_values_and_gradients():
  params, x = random_params(TINY, seed=5), pixels(TINY)

  def loss(cfg):
    return lambda p: jnp.sum(SamVisionTower(cfg).apply({"params": p}, x) ** 2)

  value, grads = jax.value_and_grad(loss(TINY))(params)
  value_r, grads_r = jax.value_and_grad(loss(dataclasses.replace(TINY, remat=True)))(params)
  np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
  # Recomputing the blocks changes the order of float32 operations: gradients of O(1)
  # differ by up to ~2e-6 (a wrong recomputation would differ by O(1)).
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_registered_expert_builds_the_paper_variant():
  module, info = experts.build_expert("sam", dict(name="sam"))
  assert isinstance(module.config, SamConfig) and module.config == SamConfig()
  assert (info.input_size, info.output_grid, info.feature_dim) == (1024, (32, 32), 1024)
  tiny, _ = experts.build_expert("sam", dataclasses.asdict(TINY))
  images = jnp.asarray(np.random.default_rng(6).integers(0, 256, (1, 64, 64, 3)), jnp.uint8)
  variables = tiny.init(jax.random.key(0), images)
  assert "eagle_neck" in variables["params"]
  assert tiny.apply(variables, images).shape == (1, 9, 16)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="SamConfig.neck"):
    SamConfig(neck="short")
  with pytest.raises(ValueError, match="global_attn_indexes"):
    SamConfig(num_layers=4, global_attn_indexes=(5,))
  with pytest.raises(ValueError, match="pixel_unshuffle"):
    dataclasses.replace(TINY, pixel_unshuffle=4)
  with pytest.raises(ValueError, match="unknown field"):
    SamConfig.from_config({"hidden": 3})
  with pytest.raises(ValueError, match="position tables are for 48"):
    SamVisionTower(TINY).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
