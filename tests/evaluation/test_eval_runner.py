"""eval.py's benchmark loop without a model: reading every benchmark first, the answer
length, the output folder and the summary rebuilt from every metrics.json."""

import json
import os

import ml_collections
import pytest

from leo_mini_jax.evaluation import benchmarks, runner
from tests.evaluation import benchmark_fixtures


def _eval_cfg(**overrides):
  cfg = dict(max_new_tokens=0, batch_size=4, num_examples=0, benchmark="all", data_dir="",
             split="", skip_bad=False, routing=True, output_dir="")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_answer_length_and_output_dir():
  mme, ocrbench = benchmarks.get("mme"), benchmarks.get("ocrbench")
  assert runner.answer_length(mme, _eval_cfg()) == 16
  assert runner.answer_length(ocrbench, _eval_cfg()) == 128
  assert runner.answer_length(ocrbench, _eval_cfg(max_new_tokens=8)) == 8
  assert runner.output_dir(_eval_cfg(), "/run") == os.path.join("/run", "eval")
  assert runner.output_dir(_eval_cfg(output_dir="/elsewhere"), "/run") == "/elsewhere"


def test_every_benchmark_is_read_before_generation_and_problems_are_listed(tmp_path):
  for name in ("mme", "gqa", "pope"):
    benchmark_fixtures.write(str(tmp_path), name, "llava")
  os.remove(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl")
  os.remove(tmp_path / "pope" / "coco" / "coco_pope_random.json")
  with pytest.raises(benchmarks.BenchmarkError) as error:
    runner.read_benchmarks(_eval_cfg(data_dir=str(tmp_path)))
  message = str(error.value)
  assert message.startswith("2 benchmark(s) cannot be read")
  assert "llava_gqa_testdev_balanced.jsonl" in message and "coco_pope_random.json" in message
  read = runner.read_benchmarks(_eval_cfg(data_dir=str(tmp_path), skip_bad=True))
  assert [(bench.name, len(samples)) for bench, samples in read] == [("mme", 6)]


def test_summary_is_rebuilt_from_every_metrics_file(tmp_path):
  for name, score in (("pope", 85.0), ("mme", 1500.0), ("mmbench_cn", 60.0)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.json", "w") as f:
      json.dump({"score": score, "num_skipped": 0}, f)
  os.makedirs(tmp_path / "not_a_benchmark")
  (tmp_path / "not_a_benchmark" / "metrics.json").write_text("{}")
  summary = runner.format_summary(runner.collect_metrics(str(tmp_path)), 64)
  header, _, row = summary.splitlines()
  assert header == "| # V tokens | MME^P | POPE | MMBench-CN |"
  assert row == "| 64 | 1500.0 | 85.0 | 60.0 |"
