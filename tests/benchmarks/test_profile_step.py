"""benchmarks/profile_step.py attributes the traced ops of a train step to model modules."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import profile_step  # noqa: E402

from tests.training.conftest import small_config  # noqa: E402


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
  durations = {}
  for event in events:
    group = profile_step.component(sources[event["name"]], 2) if event["name"] in sources \
        else "(no source)"
    durations[group] = durations.get(group, 0.0) + event.get("dur", 0)
  total = sum(durations.values())
  # The model's forward and backward hold a good part of a stage-2 step even at a size
  # where XLA's copies and broadcasts (no source) weigh much.
  llm = sum(v for k, v in durations.items() if k.startswith("llm."))
  vision = sum(v for k, v in durations.items() if k.startswith("encode_images/vision"))
  assert llm > 0.05 * total and vision > 0.05 * total, durations
  assert total - durations.get("(no source)", 0.0) > 0.4 * total, durations
