"""benchmarks.steps: the whole-step comparison builds the model it claims on both sides."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("timm")

from benchmarks import components
from benchmarks import steps
from configs import tiny
from leo_mini_jax.evaluation import workload
from leo_mini_jax.training import loop
from leo_mini_jax.training import optimizer as optimizer_lib


@pytest.mark.parametrize("stage", [2, 3])
def test_tiny_size_is_the_tiny_config(stage):
  size = components.SIZES["tiny"]
  built = steps.model_config(size, stage, size["batch"])
  assert built.model.to_dict() == tiny.get_config(f"stage={stage}").model.to_dict()
  assert built.data.max_length == 64 and built.data.resolution == 64


@pytest.mark.parametrize("stage", [2, 3])
def test_torch_side_trains_what_the_stage_trains(stage):
  """Same number of trained values as the JAX stage's trainable set; one step moves them."""
  size = components.SIZES["tiny"]
  config = steps.model_config(size, stage, 4)
  abstract = loop.TrainSetup(config).abstract_state.params
  setup_mask = optimizer_lib.trainable_mask(abstract, config.schedule)
  jax_trained = sum(p.size for p, m in zip(jax.tree.leaves(abstract),
                                          jax.tree.leaves(setup_mask)) if m)
  torch.manual_seed(0)
  model = steps.TorchLeoMini(torch, config, workload.synthetic_batch(config))
  assert sum(p.numel() for p in model.params) == jax_trained
  before = [p.detach().clone() for p in model.params]
  loss = float(model.step())
  assert np.isfinite(loss) and abs(loss - np.log(config.model.llm.vocab_size)) < 1.0
  moved = [not torch.equal(b, p) for b, p in zip(before, model.params)]
  # LoRA A matrices get no gradient while B is at its zero init; everything else moves.
  assert sum(moved) >= len(moved) // 2
  if stage == 3:
    frozen = [p for p in model.llm.parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in model.clip.parameters())
