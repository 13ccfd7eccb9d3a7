"""validate_config names the field for each bad value, in every entry point."""

import functools
import os
import subprocess
import sys

import pytest

from leo_mini_jax import config_ranges
from leo_mini_jax import config_validation
from leo_mini_jax.training import loop
from tests.training import conftest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Both experts: some checks name the second one (model.experts[1]).
small_config = functools.partial(conftest.small_config, experts=("clip", "convnext"))


def _set(config, field, value):
  node, *path = [config] + field.split(".")
  for key in path[:-1]:
    node = node[int(key)] if key.isdigit() else node[key]
  node[path[-1]] = value
  return config


def _drop_mmoe(config):
  del config.model.llm["mmoe"]
  return config


@pytest.mark.parametrize("change,field", [
    (lambda c: _set(c, "model.experts.1.name", "convnxt"), r"config.model.experts\[1\].name"),
    (lambda c: _set(c, "model.reducer.num_visual_tokens", 0),
     "config.model.reducer.num_visual_tokens"),
    (_drop_mmoe, "config.model.llm.mmoe:"),
    (lambda c: _set(c, "model.llm.mmoe.enabled", False), "config.model.llm.mmoe.enabled"),
    (lambda c: _set(c, "model.llm.mmoe.num_experts", 0), "config.model.llm.mmoe.num_experts"),
    (lambda c: _set(c, "mesh.data", 3), r"config.mesh: .*needs 3 devices, have 4"),
    (lambda c: _set(c, "model.llm.vocab_size", 200),
     r"config.data.tokenizer: 'byte' has 262 tokens, more than config.model.llm.vocab_size=200"),
    (lambda c: _set(c, "init_from", "/nonexistent/stage2"),
     "config.init_from: /nonexistent/stage2 does not exist"),
    (lambda c: _set(c, "model.vision_passes", c.data.batch_size * 2),
     r"config.model.vision_passes: \d+ passes do not divide the \d+ images of a training "
     r"micro-batch"),
])
def test_bad_value_names_the_field(change, field):
  config = change(small_config(3))
  with pytest.raises(config_validation.ConfigError, match=field):
    config_validation.validate_config(config, device_count=4, trace_model=False)
  with pytest.raises(config_validation.ConfigError, match=field):  # what train runs
    loop.validate_config(config, device_count=4)


def test_mesh_is_checked_against_the_device_count():
  config = small_config(3)
  config.mesh.update(data=-1, fsdp=2, tensor=2)
  config_validation.check_mesh(config, 8)
  with pytest.raises(config_validation.ConfigError, match="multiple of 4 devices, have 6"):
    config_validation.check_mesh(config, 6)
  config.mesh.dcn = dict(data=2)
  with pytest.raises(config_validation.ConfigError, match="config.mesh"):
    config_validation.check_mesh(config, 4)
  config_validation.check_mesh(config, 16)


def test_schedule_regex_that_matches_nothing_names_the_rule(one_device_mesh):
  config = small_config(3)
  assert config.schedule[1][0] == "reducer/.*"
  config_validation.validate_config(config, device_count=4)  # traces the tiny model: fine
  config.schedule[1] = ["reducr/.*", "main"]  # a typo: CoTR would silently stay frozen
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.schedule\[1\]: regex 'reducr/\.\*' matches no parameter"):
    config_validation.validate_config(config, device_count=4)
  with pytest.raises(config_validation.ConfigError, match=r"config.schedule\[1\]"):
    loop.TrainSetup(config, one_device_mesh)  # train, eval and benchmarks build one


def test_schedule_rule_shadowed_by_an_earlier_one():
  schedule = [("llm/.*", None), ("llm/x", "main"), ("projector/.*", "main")]
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.schedule\[1\].*earlier rule"):
    config_validation.check_schedule(schedule, ["projector/fc1/kernel", "llm/x"])
  # Built-in Table 6 rules may match nothing (SAM's neck without SAM).
  config_validation.check_schedule([("vision/sam/eagle_neck/.*", "main"), (".*", None)],
                                   ["llm/x"])
  with pytest.raises(config_validation.ConfigError, match=r"config.schedule\[0\].*compile"):
    config_validation.check_schedule([("(", None)], ["a"])


def test_train_stops_before_building_anything(tmp_path):
  config = _set(small_config(3), "model.experts.0.name", "clap")
  with pytest.raises(config_validation.ConfigError, match=r"config.model.experts\[0\].name"):
    loop.train(config, str(tmp_path), progress=False)
  assert not (tmp_path / "checkpoints").exists()


def _run(args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("entry", [
    ["eval.py", "--workdir=/nonexistent/run"],
    ["-m", "leo_mini_jax.porting.convert", "--llm=/nonexistent/llm", "--out=/nonexistent/o"],
])
def test_entry_points_validate_the_config(entry):
  result = _run(entry + ["--config=configs/tiny.py:stage=3",
                         "--config.model.reducer.num_visual_tokens=0"])
  assert result.returncode != 0
  assert "config.model.reducer.num_visual_tokens" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("field,value,message", [
    ("optimizer.clip_norm", -1.0, r"must be >= 0, got -1.0"),
    ("optimizer.warmup_steps", -3, r"must be >= 0, got -3"),
    ("optimizer.lr", float("inf"), r"must be finite > 0, got inf"),
    ("optimizer.lr", float("nan"), r"must be finite > 0, got nan"),
    ("optimizer.b1", 2.0, r"must be >= 0 and < 1, got 2.0"),
    ("checkpoint.every_steps", -1, r"must be >= 0, got -1"),
    ("checkpoint.keep_period", -1, r"must be >= 0, got -1"),
    ("data.num_workers", -1, r"must be >= 0, got -1"),
    ("data.max_length", 0, r"must be >= 2, got 0"),
    ("data.resolution", 0, r"must be >= 1, got 0"),
    ("optimizer.grad_accum_steps", 0, r"must be >= 1, got 0"),
    ("model.vision_passes", 0, r"must be >= 1, got 0"),
    ("train.loss_chunk_length", -8, r"must be >= 0, got -8"),
])
def test_numeric_fields_out_of_range_stop_at_start_naming_the_field(field, value, message):
  config = _set(small_config(2), field, value)
  with pytest.raises(config_validation.ConfigError,
                     match=rf"^config\.{field}: {message}"):
    loop.validate_config(config, device_count=0)
  with pytest.raises(config_validation.ConfigError, match=rf"^config\.{field}: "):
    config_validation.validate_config(config, device_count=0, trace_model=False)


def test_every_default_is_in_range():
  for stage in (1, 2, 3):
    config_ranges.check_ranges(small_config(stage))
