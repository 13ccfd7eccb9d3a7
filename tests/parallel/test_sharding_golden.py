"""The paper models' shardings against the checked-in record (tests/parallel/golden/).

A failure shows the diff; after an intended change regenerate the record with
`python -m tests.parallel.sharding_golden --update` and review `git diff`. Stage 2's
parameters are a subset of stage 3's (same paths, names and shapes), so the default suite
checks stage 3 and the slow suite adds stage 2.
"""

import flax.linen as nn
from jax.sharding import AbstractMesh
import pytest

from leo_mini_jax.parallel import axes
from leo_mini_jax.parallel import mesh as mesh_lib
from tests.parallel import sharding_golden

CASES = [pytest.param((variant, stage), id=f"{variant}-stage{stage}",
                      marks=[pytest.mark.slow] if stage == 2 else [])
         for variant in sharding_golden.CONFIGS for stage in sharding_golden.STAGES]


@pytest.fixture(scope="module", params=CASES)
def traced(request):
  variant, stage = request.param
  text, constraints = sharding_golden.current(variant, stage)
  return variant, stage, text, constraints


def test_shardings_match_the_golden_record(traced):
  variant, stage, text, _ = traced
  message = sharding_golden.difference(variant, stage, text)
  assert not message, message


def test_every_activation_name_is_known_and_resolves_as_a_parameter_would(traced):
  """flax replicates an activation name it has no rule for: every name the forward pass
  constrains must be a known logical axis, and on a mesh where every axis divides, flax's
  resolution must equal `spec_for`'s (see its docstring)."""
  _, _, _, constraints = traced
  assert constraints
  mesh = AbstractMesh((2, 2, 2), axes.MESH_AXES)
  for where, names in set(constraints):
    unknown = [n for n in names if n is not None and n not in axes.LOGICAL_AXES]
    assert not unknown, f"{where}: activation axis names {unknown} are not in parallel/axes.py"
    flax_spec = list(nn.logical_to_mesh_axes(names, mesh_lib.DEFAULT_RULES))
    while flax_spec and flax_spec[-1] is None:
      flax_spec.pop()
    ours = mesh_lib.spec_for((8,) * len(names), names, mesh, mesh_lib.DEFAULT_RULES, where)
    assert tuple(flax_spec) == tuple(ours), (where, names)


def test_a_changed_rule_shows_as_a_diff_naming_the_parameter(traced):
  variant, stage, text, _ = traced
  changed = text.replace("[layers,embed,kv_heads]  8:[_,fsdp,_]",
                         "[layers,embed,kv_heads]  8:[_,_,_]", 1)
  assert changed != text
  message = sharding_golden.difference(variant, stage, changed)
  assert "llm/layers/attention/k_proj/kernel" in message
  assert "sharding_golden --update" in message
