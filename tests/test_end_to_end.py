"""A short run of train.py and eval.py on the tiny config: loss falls, eval writes results.

Runs the real command lines in subprocesses on one CPU device.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.batch_size=16", "--config.data.num_train=2000",
         "--config.data.num_eval=24", "--config.eval.batch_size=12",
         "--config.log_every=5", "--config.optimizer.warmup_steps=5"]


def _run(script, config, workdir, *flags):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device: no collectives queued on 2 cores
  cmd = [sys.executable, script, f"--config={config}", f"--workdir={workdir}", *SMALL,
         *flags]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_train_then_eval(tmp_path):
  stage2 = str(tmp_path / "stage2")
  _run("train.py", "configs/tiny.py:stage=2,steps=60", stage2)
  with open(os.path.join(stage2, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [row["loss"] for row in rows]
  assert [row["step"] for row in rows][-1] == 60
  assert losses[-1] < 0.6 * losses[0], losses
  assert rows[-1]["token_accuracy"] > rows[0]["token_accuracy"] + 0.2
  assert os.listdir(os.path.join(stage2, "tensorboard"))

  # Stage 3 starts from stage 2: CoTR and MMoE-LLM fresh, the rest restored.
  stage3 = str(tmp_path / "stage3")
  _run("train.py", "configs/tiny.py:stage=3,steps=5", stage3,
       f"--config.init_from={stage2}")
  out = _run("eval.py", "configs/tiny.py:stage=3", stage3)
  assert "blind" in out and "overall" in out
  with open(os.path.join(stage3, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["num_examples"] == 24
  assert metrics["num_visual_tokens"] == 4
  assert set(metrics["accuracy"]) >= {"overall", "color", "shape"}
  assert metrics["prefill_flops"] > 0
  with open(os.path.join(stage3, "eval", "predictions.jsonl")) as f:
    predictions = [json.loads(line) for line in f]
  assert len(predictions) == 24
  assert {"id", "question_type", "prediction", "reference"} <= set(predictions[0])


def test_llava_json_with_bad_records_trains_and_reports_them(tmp_path):
  from leo_mini_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from tests.data.test_llava import _bad_json  # pylint: disable=import-outside-toplevel
  json_path = synthetic.export(str(tmp_path), "train", 24, 64, seed=3)
  with open(json_path) as f:
    good = json.load(f)
  bad_path = _bad_json(tmp_path, good[:6])
  with open(bad_path) as f:
    records = json.load(f) + good[6:]
  with open(bad_path, "w") as f:
    json.dump(records, f)
  flags = ["--config.data.kind=llava", f"--config.data.train_json={bad_path}",
           f"--config.data.eval_json={bad_path}"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "train.py", "--config=configs/tiny.py:stage=2,steps=3,experts=clip",
         f"--workdir={tmp_path / 'run'}", "--config.data.batch_size=4", *flags]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stdout + result.stderr
  assert "3 skipped" in log
  for record_id in ("missing-image", "unreadable-image", "malformed-conversation"):
    assert record_id in log
  # A fresh workdir: the first run is finished, and re-running a finished run exits 0
  # before reading its data.
  strict_cmd = [f"--workdir={tmp_path / 'strict'}" if arg.startswith("--workdir=") else arg
                for arg in cmd]
  strict = subprocess.run(strict_cmd + ["--config.data.strict=True"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert strict.returncode != 0
  assert "missing-image" in strict.stderr and "unreadable-image" not in strict.stderr
