"""benchmarks.train_step counts the FLOPs of the jitted train step it times.

The step enters the mesh context itself, so counting traces it inside `make_jaxpr`
(where `jax.set_mesh` is refused): this broke once without any test noticing.
"""

import jax

from leo_mini_jax.evaluation import flops
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def test_flops_of_the_jitted_step_cover_forward_and_backward():
  config = small_config(2)
  config.model.llm.num_layers = 1
  setup = loop.TrainSetup(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in loop.dummy_batch(config, config.data.batch_size).items()}
  step_flops = flops.count_flops(
      setup.jit_train_step(), setup.abstract_state, batch).total_matmul
  forward_flops = flops.count_flops(
      lambda params, b: setup.model.apply({"params": params}, b),
      setup.abstract_state.params, batch).total_matmul
  # Stage 2 trains everything: backward ≈ 2× forward (input and weight gradients).
  assert 2.5 * forward_flops < step_flops < 4 * forward_flops, (forward_flops, step_flops)
