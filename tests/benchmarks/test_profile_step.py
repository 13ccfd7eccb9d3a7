"""benchmarks.profile_step attributes the traced ops of a train step to model modules."""

from benchmarks import profile_step
from tests.training.conftest import small_config


def test_component_strips_transformations_and_keeps_modules():
  name = ("jit(guarded)/transpose(jvp(LeoMini))/llm.forward/llm.decoder/while/body/"
          "closed_call/layers/mlp/gate_proj/dot_general")
  assert profile_step.component(name, 3) == "llm.decoder/layers/mlp"
  assert profile_step.component(name, 1) == "llm.decoder"
  images = ("jit(guarded)/jvp(LeoMini)/LeoMini._inputs/LeoMini.encode_images/vision/"
            "convnext/jit(resize)/mul")
  assert profile_step.component(images, 3) == "encode_images/vision/convnext"
  assert profile_step.component("jit(guarded)/jvp()/reduce", 2) == profile_step.OUTSIDE_MODEL


def test_traced_ops_of_a_step_are_attributed_to_the_model(tmp_path):
  config = small_config(2)
  config.model.llm.num_layers = 1
  events, sources = profile_step.profile(config, 2, str(tmp_path))
  assert events, "the trace holds no op events"
  per_component, _ = profile_step.summarize(events, sources, depth=2, steps=1)
  # Op counts, not durations: shares of time move with the machine's load.
  compute_ops = {group: ops - memory for group, (_, ops, memory) in per_component.items()}
  llm = sum(n for group, n in compute_ops.items() if group.startswith("llm."))
  vision = sum(n for group, n in compute_ops.items() if group.startswith("encode_images/vision"))
  assert llm > 0 and vision > 0, per_component
  # The matmuls and convolutions of the step all come from the model or the loss, so
  # (nearly) every one has a source; a broken op_name parse leaves them unattributed.
  matmuls = [e["name"] for e in events if e["name"].startswith(("ynn_fusion", "dot", "conv"))]
  assert matmuls, "no matmul ops in the trace"
  assert sum(name in sources for name in matmuls) >= 0.9 * len(matmuls)
