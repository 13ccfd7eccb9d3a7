"""eval.py end to end on the tiny model: all 13 benchmarks in each on-disk layout."""

import json
import os
import shutil
import subprocess
import sys


from leo_mini_jax.evaluation import benchmarks
from tests.evaluation import benchmark_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _eval_py(workdir, *flags):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device: no collectives queued on 2 cores
  cmd = [sys.executable, "eval.py", "--config=configs/tiny.py:stage=3,steps=2,experts=clip",
         f"--workdir={workdir}", "--config.data.batch_size=4", "--config.data.num_train=8",
         "--config.data.num_eval=4", "--config.eval.max_new_tokens=4", *flags]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_eval_py_runs_every_benchmark_in_both_layouts(stage3_run, tmp_path):
  # The session's trained run (tests/conftest.py; train.py itself runs in the kill/resume
  # test), copied: eval.py writes into the workdir.
  run = str(tmp_path / "run")
  shutil.copytree(stage3_run.workdir, run)
  for layout in ("llava", "parquet"):
    data = tmp_path / layout
    for name in benchmarks.ORDER:
      benchmark_fixtures.write(str(data), name, layout)
    if layout == "llava":
      os.remove(data / "gqa" / "data" / "images" / "n288871.jpg")
    out = _eval_py(run, "--config.eval.benchmark=all", f"--config.eval.data_dir={data}",
                   "--config.eval.skip_bad=True", "--config.eval.batch_size=4")
    eval_dir = os.path.join(run, "eval")
    titles = [benchmarks.REGISTRY[n].title for n in benchmarks.ORDER]
    with open(os.path.join(eval_dir, "summary.md")) as f:
      header = f.readline()
    assert header.split("|")[2:-1] == [f" {t} " for t in titles], header
    assert "MME^P" in out and "OCRBench" in out
    for name in benchmarks.ORDER:
      folder = os.path.join(eval_dir, name)
      with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
      with open(os.path.join(folder, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
      assert len(predictions) == metrics["num_generated"] > 0, name
      with open(os.path.join(folder, "routing.json")) as f:
        routing = json.load(f)
      assert routing["num_layers"] == 2 and routing["num_experts"] == 3
      assert os.path.exists(os.path.join(folder, "routing.png"))
    with open(os.path.join(eval_dir, "gqa", "metrics.json")) as f:
      gqa = json.load(f)
    assert gqa["num_skipped"] == (1 if layout == "llava" else 0)
    assert gqa["num_generated"] == (1 if layout == "llava" else 2)
    assert os.path.exists(os.path.join(eval_dir, "mmbench", "mmbench_dev_en_submission.xlsx"))
    assert os.path.exists(os.path.join(eval_dir, "routing.png"))
    assert "MME^P: 6 questions in" in out  # the time each benchmark took


def test_eval_py_output_dir_and_summary_of_two_invocations(stage3_run, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(stage3_run.workdir, run)
  data = tmp_path / "data"
  for name in ("mme", "pope"):
    benchmark_fixtures.write(str(data), name, "llava")
  out_dir = tmp_path / "scores"
  for name in ("mme", "pope"):
    _eval_py(run, f"--config.eval.benchmark={name}", f"--config.eval.data_dir={data}",
             f"--config.eval.output_dir={out_dir}", "--config.eval.batch_size=4")
  with open(out_dir / "summary.md") as f:
    header = f.readline()
  assert header == "| # V tokens | MME^P | POPE |\n"  # the second run added a column
  assert not os.path.exists(os.path.join(run, "eval", "summary.md"))
