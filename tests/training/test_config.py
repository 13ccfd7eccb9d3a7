"""Config files: arg knobs, overrides, and start-up validation that names the field."""

import pytest

from configs import common, leo_mini_llama3_8b, leo_mini_vicuna_7b, tiny
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def test_arg_knobs_change_several_fields():
  config = tiny.get_config("stage=3,tokens=16,reducer=mqt,router=hidden")
  assert config.stage == 3
  assert config.model.reducer.kind == "mqt"
  assert config.model.reducer.num_visual_tokens == 16
  assert config.model.llm.mmoe.enabled and config.model.llm.mmoe.router_inputs == "hidden"
  stage2 = tiny.get_config("stage=2")
  assert stage2.model.reducer.kind == "none" and not stage2.model.llm.mmoe.enabled
  assert [rule[1] for rule in stage2.schedule] == ["main"]


@pytest.mark.parametrize("arg,match", [("stage=x", "stage"), ("tokenz=4", "tokenz"),
                                       ("stage", "key=value")])
def test_bad_arg_names_the_knob(arg, match):
  with pytest.raises(ValueError, match=match):
    tiny.get_config(arg)


def test_parse_arg_types():
  parsed = common.parse_arg("a=3,b=0.5,c=x,d=true", a=1, b=1.0, c="y", d=False)
  assert (parsed.a, parsed.b, parsed.c, parsed.d) == (3, 0.5, "x", True)


@pytest.mark.parametrize("field,value,match", [
    ("stage", 4, "config.stage"),
    ("optimizer.grad_accum_steps", 3, "config.optimizer.grad_accum_steps"),
    ("optimizer.lr", 0.0, "config.optimizer.lr"),
    ("optimizer.decay", "linear", "config.optimizer.decay"),
])
def test_invalid_values_fail_at_start_naming_the_field(field, value, match):
  config = small_config(2)
  node, *path = [config] + field.split(".")
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  with pytest.raises(ValueError, match=match):
    loop.validate_config(config)


def test_bad_model_field_fails_at_start():
  config = small_config(2)
  config.model.llm.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    loop.validate_config(config)


@pytest.mark.parametrize("module", [leo_mini_vicuna_7b, leo_mini_llama3_8b])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_full_size_configs_validate(module, stage):
  loop.validate_config(module.get_config(f"stage={stage}"))
