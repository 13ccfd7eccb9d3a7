"""A sharded train step on 4 fake CPU devices equals the single-device step.

On a 2-core machine CPU collectives stall when many steps are queued, so every step is
blocked on before the next one starts.
"""

import jax
import numpy as np
import pytest

from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def _run_steps(config, mesh, batches):
  setup = loop.TrainSetup(config, mesh)
  state = setup.init_state(0)
  step = setup.jit_train_step()
  losses = []
  for batch in batches:
    state, metrics = step(state, setup.global_batch(batch))
    losses.append(float(metrics["loss"]))  # blocks: one step in flight at a time
  return jax.device_get(state.params), losses, setup


@pytest.mark.parametrize("stage,mesh_shape", [(3, dict(data=2, tensor=2)),
                                              (2, dict(fsdp=4))])
def test_sharded_step_matches_single_device(stage, mesh_shape):
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake devices"
  config = small_config(stage)
  # Adam's first steps move every weight by ~lr·sign(g); with eps=1e-8 a gradient that is
  # float noise (~1e-9) then turns the summation-order differences between meshes into
  # lr-sized parameter differences. A larger eps keeps the comparison about the step.
  config.optimizer.eps = 1e-3
  data = pipeline_lib.make_dataset(config.data, split="train")
  iterator = data.iterator()
  batches = [next(iterator) for _ in range(2)]
  single_mesh = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  want, want_losses, _ = _run_steps(config, single_mesh, batches)
  got, got_losses, setup = _run_steps(config, mesh_lib.make_mesh(mesh_shape), batches)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # The state really is sharded: some parameter is split across devices.
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
  assert any(any(axis is not None for axis in spec) for spec in specs)


def test_mesh_sizes_are_checked():
  with pytest.raises(ValueError, match="needs 8 devices"):
    mesh_lib.make_mesh(dict(data=2, tensor=4))
  with pytest.raises(ValueError, match="unknown axes"):
    mesh_lib.make_mesh(dict(model=4))
  assert mesh_lib.make_mesh(dict(data=-1, tensor=2)).shape == {"data": 2, "fsdp": 1,
                                                                "tensor": 2}


def test_specs_drop_axes_that_do_not_divide():
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=2))
  rules = mesh_lib.DEFAULT_RULES
  assert mesh_lib.spec_for((64, 128), ("embed", "mlp"), mesh, rules) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  assert mesh_lib.spec_for((3, 64, 8), ("lora_experts", "embed", "lora_rank"), mesh,
                           rules) == jax.sharding.PartitionSpec(None, "fsdp")
  assert mesh_lib.spec_for((5, 7), ("embed", "mlp"), mesh, rules) == \
      jax.sharding.PartitionSpec()
