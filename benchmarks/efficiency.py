"""Table 4 of the paper: prefill cost of one image + "What is shown in this image?".

  python -m benchmarks.efficiency --config configs/leo_mini_llama3_8b.py --out table4.json

Rows: the config at stage 3 with N^V = 1, 16, 64, 256 (CoTR, MMoE-LLM) and at stage 2
(no reduction: EAGLE's fusion of every expert onto one grid, 1024 tokens at paper scale).
Columns, from abstract shapes (no weights; runs on a CPU laptop): visual tokens, prefill
FLOPs (dot + conv, every layer, per vision expert, reducer, projector and LLM), parameter
bytes and KV-cache bytes at the prompt length. Then, on the present device, with random
weights where they fit in its memory: measured prefill latency and memory (a note where
they do not; --measure=never skips this). The table states each row's FLOPs as a ratio
to the no-reduction row, beside the paper's (16.4 / 29.4 TFLOPs at N^V = 64).

The prompt goes through the config's template (data.template) and tokenizer
(data.tokenizer); with no tokenizer configured its token count is estimated, and the JSON
says so. Extra config knobs pass through: --config path.py:reducer=mqt.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from leo_mini_jax import config_files
from leo_mini_jax import config_validation
from leo_mini_jax.evaluation import efficiency
from leo_mini_jax.models import leo_mini as leo_mini_lib

# Paper Table 4 (PyTorch profiler, one A6000): TFLOPs, CUDA time s, GPU memory GB.
PAPER = {"no reduction": {"visual_tokens": 1024, "tflops": 29.4, "latency_s": 2.073,
                          "memory_gb": 20.10, "model": "Eagle-X4-Plus"},
         1: {"visual_tokens": 1, "tflops": 13.7, "latency_s": 0.593, "memory_gb": 19.28},
         64: {"visual_tokens": 64, "tflops": 16.4, "latency_s": 0.655, "memory_gb": 19.34}}
FLOP_COUNTING = (
    "prefill_flops: dot_general and conv_general_dilated counted exactly from the jaxpr "
    "(2 per multiply-add; convolution taps on padding excluded, as XLA counts them), every "
    "layer of a scanned stack counted; elementwise_flops (1 per output element, reductions "
    "1 per input element) and transcendentals are counted apart and not included")


def define_flags():
  """The script's flags (defined only when run, so tests can import the module)."""
  flags.DEFINE_string("config", "configs/leo_mini_llama3_8b.py",
                      "Config file, optionally with :arg knobs (not stage/tokens).")
  flags.DEFINE_string("out", "", "Write the rows here as JSON.")
  flags.DEFINE_list("tokens", ["1", "16", "64", "256"], "N^V of the CoTR rows.")
  flags.DEFINE_enum("measure", "auto", ["auto", "never", "force"],
                    "Measure latency and memory: where the weights fit, never, or even "
                    "when the estimate says they do not fit.")
  flags.DEFINE_integer("repeats", 5, "Timed prefill runs per row (median).")
  flags.DEFINE_string(
      "param_dtype", "compute",
      "Weights' dtype for the measured runs: 'compute' (the LLM's compute dtype, as an "
      "inference server holds them), 'config' (the config's parameter dtypes) or a dtype.")


def row_configs(config_arg: str, tokens: list[int]) -> list[tuple[str, object]]:
  """[(row name, run config)]: stage 3 at each N^V, then stage 2 (no reduction)."""
  path, _, extra = config_arg.partition(":")
  items = [item for item in extra.split(",") if item]
  for item in items:
    if item.split("=")[0].strip() in ("stage", "tokens"):
      raise ValueError(f"--config {config_arg}: stage and tokens are set per row")
  module = config_files.load_config_module(path)
  join = lambda *xs: ",".join(list(xs) + items)
  rows = [(f"N^V={n}", module.get_config(join("stage=3", f"tokens={n}"))) for n in tokens]
  rows.append(("no reduction", module.get_config(join("stage=2"))))
  return rows


def resolve_param_dtype(flag: str, model_cfg: leo_mini_lib.LeoMiniConfig) -> str | None:
  if flag == "config":
    return None
  return model_cfg.llm.dtype if flag == "compute" else flag


def build_rows(config_arg: str, tokens: list[int], measure: str = "never",
               repeats: int = 5, param_dtype: str = "compute") -> dict:
  """The report: {'config', 'device', 'prompt', 'flop_counting', 'rows': [...]}."""
  rows, prompt = [], None
  for name, config in row_configs(config_arg, tokens):
    config_validation.validate_config(config, device_count=0, trace_model=False,
                                      init_from=False)
    model_cfg = leo_mini_lib.LeoMiniConfig.from_config(config.model)
    row_prompt = efficiency.table4_prompt(config.data)
    prompt = prompt or row_prompt
    start = time.perf_counter()
    row = {"name": name, "reducer": model_cfg.reducer.kind,
           "experts": list(model_cfg.expert_names)}
    row.update(efficiency.prefill_costs(model_cfg, row_prompt["text_tokens"],
                                        int(config.data.resolution)))
    row["count_s"] = time.perf_counter() - start
    if measure != "never":
      row["measured"] = efficiency.measure_prefill(
          model_cfg, row_prompt["text_tokens"], int(config.data.resolution), repeats,
          resolve_param_dtype(param_dtype, model_cfg), force=measure == "force")
    rows.append(row)
  reference = rows[-1]["prefill_flops"]
  for row in rows:
    row["flops_ratio_to_no_reduction"] = row["prefill_flops"] / reference
    paper = PAPER.get("no reduction" if row["name"] == "no reduction"
                      else row["visual_tokens"] if row["reducer"] != "none" else None)
    if paper:
      row["paper"] = dict(paper, flops_ratio=paper["tflops"] / PAPER["no reduction"]["tflops"])
  device = jax.local_devices()[0]
  return {"config": config_arg, "device": f"{jax.device_count()} x {device.device_kind}",
          "prompt": prompt, "flop_counting": FLOP_COUNTING, "rows": rows}


def _gib(x):
  return f"{x / 2**30:.2f}" if x else "-"


def _flop_unit(largest: float) -> tuple[str, float]:
  for name, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9)):
    if largest >= scale:
      return name, scale
  return "MFLOPs", 1e6


def format_table(report: dict) -> str:
  rows = report["rows"]
  components = sorted({c for row in rows for c in row["flops"]},
                      key=lambda c: (not c.startswith("vision/"), c))
  prompt = report["prompt"]
  unit, scale = _flop_unit(max(row["prefill_flops"] for row in rows))
  lines = [f"config {report['config']} on {report['device']}",
           f"prompt: <image> + {prompt['question']!r} via template {prompt['template']}: "
           f"{prompt['text_tokens']} text tokens ({prompt['tokenizer']})",
           f"{unit} of one prefill (dot + conv, every layer):"]
  header = (f"{'row':<14}{'VT':>6}{'seq':>6}{'total':>9}{'vision':>9}"
            + "".join(f"{c.split('/')[-1][:10]:>11}" for c in components)
            + f"{'ratio':>8}{'paper':>8}{'params MiB':>12}{'KV MiB':>9}"
            + f"{'latency ms':>12}{'XLA mem GiB':>13}{'peak GiB':>10}")
  lines.append("-" * len(header))
  lines.append(header)
  notes = []
  for row in rows:
    paper = row.get("paper")
    measured = row.get("measured") or {}
    if measured and not measured.get("measured"):
      notes.append(f"{row['name']}: {measured['note']}")
    latency = f"{1e3 * measured['latency_s']:.1f}" if measured.get("measured") else "-"
    lines.append(
        f"{row['name']:<14}{row['visual_tokens']:>6}{row['sequence_length']:>6}"
        f"{row['prefill_flops'] / scale:>9.3f}{row['vision_flops'] / scale:>9.3f}"
        + "".join(f"{row['flops'].get(c, 0) / scale:>11.3f}" for c in components)
        + f"{row['flops_ratio_to_no_reduction']:>8.3f}"
        + (f"{paper['flops_ratio']:>8.3f}" if paper else f"{'-':>8}")
        + f"{row['param_bytes'] / 2**20:>12.1f}{row['kv_cache_bytes'] / 2**20:>9.2f}"
        + f"{latency:>12}{_gib(measured.get('xla_memory_bytes')):>13}"
        + f"{_gib(measured.get('peak_bytes_in_use')):>10}")
  lines.append("ratio: this row's FLOPs / the no-reduction row's; paper: Table 4's ratio "
               "(13.7 and 16.4 vs 29.4 TFLOPs for N^V = 1 and 64 vs Eagle-X4-Plus).")
  lines.append("params: bytes in the config's parameter dtypes; peak: the device's "
               "process-wide peak after the row (rows run in ascending size).")
  lines += notes
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    tokens = sorted(int(t) for t in f.tokens)  # ascending: see the peak note
    report = build_rows(f.config, tokens, f.measure, f.repeats, f.param_dtype)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"benchmarks.efficiency: {e}")
  print(format_table(report))
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    with open(f.out, "w") as out:
      json.dump(report, out, indent=2)
    print(f"wrote {f.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
