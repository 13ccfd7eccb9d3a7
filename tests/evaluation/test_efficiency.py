"""FLOPs from the jaxpr against XLA's count, the prefill cost report and the Table-4 rows."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import efficiency as efficiency_script
from configs import tiny
from leo_mini_jax.data import conversation, tokenizers
from leo_mini_jax.evaluation import efficiency, flops
from leo_mini_jax.models import leo_mini as leo_mini_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _xla(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", 0.0))


def _conv(strides, padding, groups=1, lhs_dilation=None, rhs_dilation=None):
  return lambda x, k: jax.lax.conv_general_dilated(
      x, k, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@pytest.mark.parametrize("fn,args", [
    (lambda a, b: a @ b, (S((8, 16), F32), S((16, 4), F32))),
    (lambda a, b: jnp.einsum("btnh,bsnh->bnts", a, b),
     (S((2, 5, 3, 8), F32), S((2, 7, 3, 8), F32))),
    # ConvNeXt's padded depthwise 7×7: taps on padding are not work.
    (_conv((1, 1), ((3, 3), (3, 3)), groups=8), (S((1, 9, 11, 8), F32), S((7, 7, 1, 8), F32))),
    (_conv((4, 4), "VALID"), (S((2, 16, 16, 3), F32), S((4, 4, 3, 8), F32))),
    (_conv((2, 1), ((1, 2), (0, 1)), rhs_dilation=(2, 1)),
     (S((1, 10, 9, 4), F32), S((3, 2, 4, 6), F32))),
    (_conv((1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2)),
     (S((1, 5, 5, 4), F32), S((3, 3, 4, 2), F32))),
])
def test_dot_and_conv_flops_equal_xla_exactly(fn, args):
  count = flops.count_flops(fn, *args)
  assert count.total_elementwise == 0
  assert count.total_matmul == _xla(fn, *args)


def test_a_scan_body_counts_once_per_iteration():
  def scanned(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

  def unrolled(x, w):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x

  args = (S((4, 16), F32), S((6, 16, 16), F32))
  per_layer = 2 * 4 * 16 * 16
  assert flops.count_flops(scanned, *args).total_matmul == 6 * per_layer
  assert flops.count_flops(unrolled, *args).total_matmul == 6 * per_layer
  assert flops.count_flops(scanned, *args, scan_bodies_once=True).total_matmul == per_layer
  assert _xla(unrolled, *args) >= 6 * per_layer  # XLA: every layer when unrolled ...
  assert _xla(scanned, *args) < 2 * per_layer  # ... the body once under a scan


def test_component_of_reads_flax_scopes():
  assert flops.component_of("LeoMini.prefill/LeoMini._inputs/LeoMini.encode_images/"
                            "vision/clip/tower/layers/mlp/fc1") == "vision/clip"
  assert flops.component_of("LeoMini.prefill/llm.prefill/llm.decoder/layers/attention/"
                            "q_proj") == "llm"
  assert flops.component_of("LeoMini.prefill/LeoMini.encode_images/reducer/cotr/"
                            "bqn,bnd->bqd") == "reducer"
  assert flops.component_of("LeoMini.prefill/LeoMini._inputs") == "other"
  assert flops.component_of("") == "other"
  # VisionExperts calls its own _encode (inside the passes' scan or not).
  assert flops.component_of("LeoMini.prefill/LeoMini.encode_images/vision/vision._encode/clip/"
                            "tower/patch_embedding") == "vision/clip"


def _model_config(arg="stage=3,tokens=4", scan_layers=True):
  cfg = leo_mini_lib.LeoMiniConfig.from_config(tiny.get_config(arg).model)
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=scan_layers))


def test_prefill_count_agrees_with_xla_on_the_unrolled_model():
  # LLM unrolled; the vision towers stay scanned, so both counts take their bodies once.
  program = efficiency.prefill_program(_model_config(scan_layers=False), 40, 64)
  once = flops.count_flops(program.fn, program.abstract_params, program.batch,
                           scan_bodies_once=True)
  xla = efficiency.xla_flops(program)
  # XLA adds elementwise work (norms, softmax, rotary, resize weights), which our count
  # approximates; dot + conv alone must stay below XLA's total and within a few percent.
  assert once.total_matmul <= xla <= 1.1 * once.total_matmul
  np.testing.assert_allclose(once.total_matmul + once.total_elementwise, xla, rtol=0.05)


def test_scanned_and_unrolled_llm_count_the_same_and_match_the_formula():
  config = _model_config()
  costs = {scan: efficiency.prefill_costs(_model_config(scan_layers=scan), 40, 64)
           for scan in (True, False)}
  assert costs[True]["flops"] == costs[False]["flops"]
  row = costs[True]
  assert set(row["flops"]) == {"vision/clip", "vision/convnext", "reducer", "projector",
                               "llm"}
  assert row["prefill_flops"] == sum(row["flops"].values())
  assert row["vision_flops"] == row["flops"]["vision/clip"] + row["flops"]["vision/convnext"]
  # The analytic formula applies the LM head to every token and the router's context
  # projection per token; the prefill takes logits of the last token only and projects
  # the (per-example) router context once.
  llm, seq = config.llm, row["sequence_length"]
  expected = efficiency.llm_prefill_flops(llm, seq) - 2 * (seq - 1) * llm.hidden_size * (
      llm.vocab_size)
  expected += llm.num_layers * 2 * (2 * llm.hidden_size) * llm.mmoe.router_hidden_dim
  assert row["flops"]["llm"] == expected
  cache = 2 * llm.num_layers * seq * llm.kv_heads * llm.dim_per_head * 4
  assert row["kv_cache_bytes"] == cache
  assert row["param_bytes"] == 4 * row["param_count"]
  assert sum(row["param_bytes_by_component"].values()) == row["param_bytes"]


def test_table4_prompt_through_the_template():
  data = tiny.get_config("stage=3").data
  prompt = efficiency.table4_prompt(data)
  turns = [{"from": "human", "value": "<image>\nWhat is shown in this image?"}]
  template = conversation.get_template("vicuna_v1", system_prompt="")  # as configs/tiny.py
  expected = conversation.tokenize_prompt(turns, tokenizers.ByteTokenizer(), template,
                                          has_image=True)
  assert prompt["text_tokens"] == len(expected)
  assert prompt["tokenizer"] == "data.tokenizer=byte"
  data.tokenizer = ""
  data.template = "llama3"
  estimated = efficiency.table4_prompt(data)
  assert "estimated" in estimated["tokenizer"]
  assert estimated["template"] == "llama3"
  # <|begin_of_text|>, 4 user-header tokens, <image>, "\n", 6 words and "?", <|eot_id|>,
  # 4 assistant-header tokens (the tiny config has no system prompt).
  assert estimated["text_tokens"] == 1 + 4 + 1 + 1 + 6 + 1 + 1 + 4


def test_measure_prefill_runs_or_says_why_not(monkeypatch):
  config = _model_config()
  result = efficiency.measure_prefill(config, 24, 64, repeats=2)
  assert result["measured"] and result["latency_s"] > 0 and result["xla_memory_bytes"] > 0
  monkeypatch.setattr(efficiency, "device_memory_limit", lambda: (1000, "test limit"))
  skipped = efficiency.measure_prefill(config, 24, 64)
  assert not skipped["measured"] and "skipped" in skipped["note"]
  assert "test limit" in skipped["note"]


def _script():
  return efficiency_script


def test_table4_rows_fields_and_ratios():
  script = _script()
  report = script.build_rows(os.path.join(ROOT, "configs", "tiny.py"), [1, 4, 16])
  rows = report["rows"]
  assert [r["name"] for r in rows] == ["N^V=1", "N^V=4", "N^V=16", "no reduction"]
  for row in rows:
    assert {"name", "visual_tokens", "prefill_flops", "flops", "param_bytes",
            "kv_cache_bytes", "flops_ratio_to_no_reduction"} <= set(row)
  assert rows[-1]["reducer"] == "none" and rows[-1]["flops_ratio_to_no_reduction"] == 1.0
  ratios = [r["flops_ratio_to_no_reduction"] for r in rows[:-1]]
  assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
  assert rows[0]["paper"]["flops_ratio"] == pytest.approx(13.7 / 29.4)
  assert report["prompt"]["question"] == "What is shown in this image?"
  table = script.format_table(report)
  assert "no reduction" in table and "0.466" in table
  json.dumps(report)  # serialisable as written by --out


@pytest.mark.slow
def test_efficiency_script_writes_json(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  out = tmp_path / "table4.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.efficiency", "--config=configs/tiny.py",
       f"--out={out}", "--tokens=1,4", "--repeats=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "latency ms" in result.stdout
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["N^V=1", "N^V=4", "no reduction"]
  assert all(r["measured"]["measured"] for r in rows)


def test_efficiency_module_names_a_missing_config(tmp_path):
  """`python -m benchmarks.efficiency` runs as a module and reports a bad --config path."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  missing = tmp_path / "no_such_config.py"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.efficiency", f"--config={missing}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"benchmarks.efficiency: --config: no such file {missing}" in result.stderr
