"""Routing files, heatmaps and the two-run comparison (Fig. 8)."""

import json
import os

import numpy as np
import pytest

from leo_mini_jax.evaluation import routing


def _run(root, name, per_benchmark):
  for bench, counts in per_benchmark.items():
    out = os.path.join(root, name, "eval", bench.lower())
    os.makedirs(out)
    routing.write_routing(out, bench, np.asarray(counts))
  return os.path.join(root, name)


def test_routing_files_and_fractions(tmp_path):
  run = _run(str(tmp_path), "run", {"GQA": [[2, 2, 0], [0, 0, 0]]})
  with open(os.path.join(run, "eval", "gqa", "routing.json")) as f:
    record = json.load(f)
  assert record["fraction"] == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
  assert record["num_layers"] == 2 and record["num_experts"] == 3
  assert os.path.getsize(os.path.join(run, "eval", "gqa", "routing.png")) > 0


def test_compare_two_runs(tmp_path, capsys):
  same = [[5, 5, 0], [0, 5, 5]]
  vanilla = _run(str(tmp_path), "vanilla", {"GQA": same, "SQA": same})
  multimodal = _run(str(tmp_path), "mmoe", {"GQA": [[10, 0, 0], [0, 10, 0]],
                                            "SQA": [[0, 0, 10], [0, 10, 0]]})
  out = str(tmp_path / "fig8.png")
  routing.main([vanilla, multimodal, "--out", out])
  assert os.path.getsize(out) > 0
  printed = capsys.readouterr().out
  assert "vanilla MoE" in printed and "MMoE-LLM" in printed
  spread = routing.compare(vanilla, multimodal, out, ("v", "m"))
  # Identical routing → 0; layer 0 fully different and layer 1 equal → 0.5.
  assert spread == pytest.approx({"v": 0.0, "m": 0.5})
  with pytest.raises(SystemExit, match="no routing.json"):
    routing.main([str(tmp_path / "missing"), multimodal])
