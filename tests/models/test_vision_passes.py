"""model.vision_passes: the experts encode a batch's images in several sequential passes.

Same parameters (paths and values), same outputs, and the same gradients where the
towers train (stage 2), as one pass; on one device and with the images sharded over
four; a pass count that does not divide the images falls back to their greatest common
divisor.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from tests.models.test_leo_mini import _batch

ROWS = 8  # images; _batch's three rows (two with an image) repeated, last two cut


def _rows():
  batch = jax.tree.map(lambda x: np.concatenate([x] * 3)[:ROWS], _batch())
  batch["image"] = np.random.default_rng(1).integers(0, 256, (ROWS, 64, 64, 3), np.uint8)
  return batch


def _model(stage, passes):
  config = tiny.get_config(f"stage={stage},tokens=4,experts=clip").model
  config.vision_passes = passes
  return leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config))


def _loss_and_grads(model, params, batch):
  def loss(params):
    logits, _ = model.apply({"params": params}, batch)
    return jnp.mean(logits ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_passes_give_the_same_parameters_and_outputs():
  batch = _rows()
  one, four = _model(3, 1), _model(3, 4)
  params = nn.unbox(jax.jit(one.init)(jax.random.PRNGKey(0), batch))["params"]
  got_params = nn.unbox(jax.jit(four.init)(jax.random.PRNGKey(0), batch))["params"]
  assert jax.tree.structure(got_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  forward = lambda model: jax.jit(lambda p: model.apply({"params": p}, batch)[0])(params)
  np.testing.assert_allclose(forward(four), forward(one), atol=1e-5, rtol=1e-5)


def test_trained_towers_get_the_same_gradients():
  batch = _rows()
  one = _model(2, 1)
  params = nn.unbox(jax.jit(one.init)(jax.random.PRNGKey(0), batch))["params"]
  want_loss, want_grads = _loss_and_grads(one, params, batch)
  got_loss, got_grads = _loss_and_grads(_model(2, 4), params, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads["vision"]))
  assert scale > 0  # the towers do get gradients through the scan
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)


def test_the_passes_run_as_a_loop_over_the_images():
  batch = _rows()
  params = nn.unbox(jax.jit(_model(3, 1).init)(jax.random.PRNGKey(0), batch))["params"]

  def loops(passes):
    model = _model(3, passes)
    hlo = jax.jit(lambda p, b: model.apply({"params": p}, b)[0]).lower(params, batch)
    return hlo.as_text().count("stablehlo.while")

  assert loops(4) == loops(1) + 1
  assert loops(3) == loops(1)  # gcd(8 images, 3) = 1: one pass


def test_passes_over_images_sharded_on_four_devices():
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake devices"
  batch = _rows()
  one = _model(3, 1)
  params = nn.unbox(jax.jit(one.init)(jax.random.PRNGKey(0), batch))["params"]
  want, _ = jax.device_get(one.apply({"params": params}, batch))
  mesh = mesh_lib.make_mesh(dict(data=4))
  sharded = mesh_lib.make_global_batch(batch, mesh)
  model = _model(3, 2)  # two images a device, one in each pass
  with mesh_lib.activate(mesh):
    got, _ = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, sharded)
  assert len(got.sharding.device_set) == 4
  np.testing.assert_allclose(jax.device_get(got), want, atol=1e-5, rtol=1e-5)
