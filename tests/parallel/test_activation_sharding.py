"""Under FSDP every device computes only its rows of the batch.

The activation constraints (`nn.with_logical_constraint`) only act when JAX's abstract
mesh is set; with them silently dropped, XLA propagated the weights' FSDP split into the
activations and every device computed the whole global batch (at paper scale: 512 GiB
per device in stage 3). This compiles the real stage-2 and stage-3 train steps on 4 fake
devices and reads the per-device buffer shapes of the compiled program.
"""

import re

import jax
import pytest

from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def _buffer_shapes(hlo_text: str) -> set[tuple[int, ...]]:
  shapes = set()
  for dims in re.findall(r"\b(?:f32|bf16)\[([\d,]+)\]", hlo_text):
    shapes.add(tuple(int(d) for d in dims.split(",")))
  return shapes


@pytest.mark.parametrize("stage", [2, 3])
def test_llm_hidden_states_hold_only_this_devices_rows(stage):
  assert jax.device_count() == 4
  config = small_config(stage)
  config.data.batch_size = 8
  config.model.llm.num_layers = 1
  if stage == 3:  # the paper configs' memory knobs must keep rows on their devices too
    config.train.loss_chunk_length = 4
    config.model.vision_passes = 2
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=1))
  setup = loop.TrainSetup(config, mesh)
  lowered = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch())
  assert "sharding_constraint" in lowered.as_text(), "activation constraints were dropped"
  shapes = _buffer_shapes(lowered.compile().as_text())

  hidden = config.model.llm.hidden_size
  global_rows = {s for s in shapes if len(s) == 3 and s[0] == 8 and s[2] == hidden}
  # The chunked loss's [chunks, rows, chunk, hidden] layout.
  global_rows |= {s for s in shapes if len(s) == 4 and s[1] == 8 and s[3] == hidden}
  device_rows = {s for s in shapes if len(s) == 3 and s[0] == 2 and s[2] == hidden}
  assert device_rows, sorted(s for s in shapes if len(s) == 3)
  assert not global_rows, f"LLM hidden states at the global batch on one device: {global_rows}"
