"""Config files: arg knobs, overrides, and start-up validation that names the field."""

import pytest

from configs import common, leo_mini_llama3_8b, leo_mini_vicuna_7b, tiny
from leo_mini_jax.training import loop
from leo_mini_jax.training import optimizer as optimizer_lib
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


def test_derived_length_is_epochs_over_usable_records():
  config = small_config(1, total_steps=0, num_epochs=2)
  assert optimizer_lib.derived_total_steps(config, 64) == (
      16, "64 records × 2 epochs / batch 8 → 16 steps")
  # data.batch_size is the global batch of one optimizer step: accumulation and the
  # process count split it, they do not change the count. A last partial batch counts.
  config.optimizer.grad_accum_steps = 2
  steps, how = optimizer_lib.derived_total_steps(config, 65)
  assert steps == 17 and how.startswith("65 records × 2 epochs / batch 8 → 17 steps")
  config.num_epochs = 0.5
  assert optimizer_lib.derived_total_steps(config, 64)[0] == 4


@pytest.mark.parametrize("module", [leo_mini_vicuna_7b, leo_mini_llama3_8b])
def test_paper_configs_derive_one_epoch_and_tiny_keeps_its_steps(module):
  for stage in (1, 2, 3):
    config = module.get_config(f"stage={stage}")
    assert config.total_steps == 0 and config.num_epochs == 1
  assert module.get_config("stage=2,steps=300").total_steps == 300
  assert tiny.get_config("stage=2").total_steps == tiny.STEPS[2]


def test_total_steps_zero_trains_num_epochs_of_the_data(tmp_path, capsys, one_device_mesh):
  """64 synthetic records × 2 epochs / batch 8 → 16 steps; the cosine reaches its end
  value at the last of them. An explicit total_steps still wins."""
  config = small_config(1, total_steps=0, num_epochs=2)
  config.optimizer.warmup_steps = 0
  summary = loop.train(config, str(tmp_path / "run"), progress=False, stop_at=1,
                       mesh=one_device_mesh)
  assert "64 records × 2 epochs / batch 8 → 16 steps" in capsys.readouterr().out
  assert summary["total_steps"] == 16 and config.total_steps == 0
  schedule = summary["setup"].lr_schedule
  assert float(schedule(15)) == pytest.approx(0.0, abs=1e-12)
  assert float(schedule(7)) == pytest.approx(config.optimizer.lr / 2, rel=1e-6)
  with pytest.raises(ValueError, match="config.num_epochs"):
    loop.validate_config(small_config(1, total_steps=0, num_epochs=0))


NECK = "vision/sam/eagle_neck/conv/kernel"


@pytest.mark.parametrize("arg,stage1_group", [("stage=1", optimizer_lib.FROZEN),
                                              ("stage=1,train_sam_neck=true", "main")])
def test_sam_neck_frozen_in_stage1_like_eagle_pretraining(arg, stage1_group):
  # EAGLE's pre-training trains only mm_projector; its new SAM neck trains from stage 2.
  schedule = leo_mini_vicuna_7b.get_config(arg).schedule
  assert optimizer_lib.group_of(NECK, schedule) == stage1_group
  assert optimizer_lib.group_of("projector/fc1/kernel", schedule) == "main"
  assert optimizer_lib.group_of("vision/sam/blocks/0/attn/qkv/kernel", schedule) == \
      optimizer_lib.FROZEN
  stage2 = leo_mini_vicuna_7b.get_config("stage=2").schedule
  assert optimizer_lib.group_of(NECK, stage2) == "main"


@pytest.mark.parametrize("module", [leo_mini_vicuna_7b, leo_mini_llama3_8b])
def test_paper_stage3_runs_the_frozen_experts_one_image_slot_at_a_time(module):
  stage3 = module.get_config("stage=3")
  assert stage3.model.vision_passes == stage3.data.max_images_per_row == 4
  assert module.get_config("stage=2").model.vision_passes == 1  # the towers train there


def test_llama3_takes_the_lm_head_a_chunk_at_a_time():
  for stage in (1, 2, 3):
    assert leo_mini_llama3_8b.get_config(f"stage={stage}").train.loss_chunk_length == 256
    # 32k vocabularies: whole logits (chunked, Vicuna stage 3 on 8 H100s peaked higher)
    assert leo_mini_vicuna_7b.get_config(f"stage={stage}").train.loss_chunk_length == 0
  assert tiny.get_config().train.loss_chunk_length == 0
