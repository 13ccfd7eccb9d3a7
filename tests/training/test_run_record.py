"""A run remembers what it is: config.json + run.json in the workdir, the saved config as
the default of train.py / eval.py / ask, contradictions refused, finished runs left alone."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from leo_mini_jax import run_record
from leo_mini_jax import saved_config
from tests.training.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def run_copy(stage3_run, tmp_path):
  """A writable copy of the session's finished tiny stage-3 run (4 of 4 steps)."""
  path = str(tmp_path / "run")
  shutil.copytree(stage3_run.workdir, path)
  return path


def test_first_start_records_the_resolved_config_and_identity(stage3_run):
  saved = run_record.load_config(stage3_run.workdir)
  assert json.loads(saved.to_json()) == json.loads(stage3_run.config.to_json())
  with open(os.path.join(stage3_run.workdir, run_record.IDENTITY_FILE)) as f:
    identity = json.load(f)
  assert identity["tokenizer"] == {"path": "byte", "sha256": "byte"}
  assert identity["data.template"] == "vicuna_v1"
  assert identity["model"]["model.llm.hidden_size"] == 128
  assert identity["model"]["model.reducer.num_visual_tokens"] == 4
  assert not any(k.endswith(".dtype") for k in identity["model"])  # runtime, not shape
  # The saved config is a config file for --config (what the CLIs use without one).
  loaded = saved_config.get_config(os.path.join(stage3_run.workdir, "checkpoints", "4"))
  assert loaded.model.llm.num_layers == 2


def test_a_contradicting_config_is_refused_naming_both_values(stage3_run, tmp_path):
  tokenizer = tmp_path / "tokenizer.json"
  tokenizer.write_text('{"model": {"type": "BPE"}}')
  config = small_config(3)
  config.data.tokenizer = str(tokenizer)
  config.data.template = "llama3"
  config.model.llm.hidden_size = 256
  config.model.llm.dtype = "bfloat16"  # how it computes: allowed
  config.optimizer.lr = 1.0  # training knobs: allowed
  with pytest.raises(run_record.RunMismatchError) as error:
    run_record.check(config, stage3_run.workdir)
  lines = str(error.value).splitlines()
  assert any("data.tokenizer" in l and "byte" in l and str(tokenizer) in l for l in lines)
  assert any("data.template" in l and "'vicuna_v1'" in l and "'llama3'" in l for l in lines)
  assert any("model.llm.hidden_size" in l and "128" in l and "256" in l for l in lines)
  assert not any("dtype" in l or "optimizer" in l for l in lines)
  ok = small_config(3, **{"optimizer.lr": 1.0, "data.batch_size": 2})
  run_record.check(ok, stage3_run.workdir)  # no error


def test_tokenizer_identity_hashes_only_the_tokenizer_files(tmp_path):
  folder = tmp_path / "llm"
  folder.mkdir()
  (folder / "tokenizer.json").write_text("{}")
  first = run_record.tokenizer_identity(str(folder))
  (folder / "model.safetensors").write_bytes(b"weights")  # not read
  assert run_record.tokenizer_identity(str(folder)) == first
  (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  assert run_record.tokenizer_identity(str(folder))["sha256"] != first["sha256"]


def test_resume_with_another_tokenizer_stops_before_training(run_copy, tmp_path):
  tokenizer = tmp_path / "tokenizer.json"
  tokenizer.write_text('{"model": {"type": "BPE"}}')
  result = _cli("train.py", "--config=configs/tiny.py:stage=3,steps=8,experts=clip",
                f"--workdir={run_copy}", f"--config.data.tokenizer={tokenizer}")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "data.tokenizer" in result.stderr and str(tokenizer) in result.stderr
  assert "byte" in result.stderr and "Traceback" not in result.stderr
  assert run_record.latest_step(run_copy) == 4


def test_rerunning_a_finished_run_says_so_and_exits_0(run_copy):
  metrics = open(os.path.join(run_copy, "metrics.jsonl")).read()
  start = time.perf_counter()
  result = _cli("train.py", f"--workdir={run_copy}")  # the saved config: 4 steps
  assert result.returncode == 0, result.stderr[-2000:]
  assert "is finished (step 4 of 4)" in result.stdout
  assert "nan" not in result.stdout
  assert time.perf_counter() - start < 60  # nothing compiled
  assert open(os.path.join(run_copy, "metrics.jsonl")).read() == metrics


def test_eval_without_config_applies_overrides_to_the_saved_config(run_copy):
  # The override lands on the run's own config (vicuna_v1) and contradicts it.
  result = _cli("eval.py", f"--workdir={run_copy}", "--config.data.template=plain")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "data.template: the run has 'vicuna_v1', the config gives 'plain'" in result.stderr
  assert "Traceback" not in result.stderr


def test_saved_config_is_the_default_only_without_config(tmp_path, stage3_run):
  argv = ["eval.py", f"--workdir={stage3_run.workdir}", "--config.eval.batch_size=2"]
  rewritten = run_record.default_to_saved_config(argv)
  assert rewritten[1].startswith("--config=") and rewritten[1].endswith(
      f"saved_config.py:{stage3_run.workdir}")
  assert rewritten[2:] == argv[1:]  # overrides after --config, as config_flags needs
  given = ["eval.py", "--config", "configs/tiny.py", f"--workdir={stage3_run.workdir}"]
  assert run_record.default_to_saved_config(given) == given
  empty = ["eval.py", f"--workdir={tmp_path}"]
  assert run_record.default_to_saved_config(empty) == empty

