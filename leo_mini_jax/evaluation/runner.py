"""Held-out evaluation: greedy generation with the KV cache, exact-match accuracy."""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.evaluation import efficiency
from leo_mini_jax.evaluation import generate as generate_lib
from leo_mini_jax.evaluation import metrics as metrics_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop


def restore_params(setup: loop.TrainSetup, workdir: str) -> Any:
  """The params of the workdir's latest checkpoint, with the setup's shardings."""
  params, _ = checkpoint_lib.load_params(workdir, setup.abstract_state.params)
  return params


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: Any = None,
             setup: loop.TrainSetup | None = None, verbose: bool = True) -> dict[str, Any]:
  """Generates answers for the eval split and scores them.

  Writes <workdir>/eval/predictions.jsonl and metrics.json. Returns the metrics dict.
  """
  setup = setup or loop.TrainSetup(config)
  if params is None:
    params = restore_params(setup, workdir)
  eval_data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  eval_data_cfg.batch_size = config.eval.batch_size
  data = pipeline_lib.make_dataset(eval_data_cfg, split="eval", mode="generate")
  tokenizer, template = data.tokenizer, data.template
  stop_ids = tuple({tokenizer.eos_id, template.end_of_turn_id(tokenizer)})
  generate = jax.jit(generate_lib.make_generate(setup.model, config.eval.max_new_tokens,
                                                template.end_of_turn_id(tokenizer)))
  limit = config.eval.get("num_examples") or None
  records, prompt_lengths = [], []
  with setup.mesh, mesh_lib.logical_axis_rules(setup.rules):
    for batch, meta in data:
      tokens = generate(params, setup.global_batch(batch))
      answers = generate_lib.decode_answers(jax.device_get(tokens), tokenizer, stop_ids)
      for row, answer in enumerate(answers):
        if not meta["valid"][row] or not meta["id"][row]:
          continue
        records.append({"id": meta["id"][row], "question_type": meta["question_type"][row],
                        "prediction": answer, "reference": meta["answer"][row]})
        prompt_lengths.append(int(batch["attention_mask"][row].sum()))
      if limit and len(records) >= limit:
        records = records[:limit]
        break
  predictions = [r["prediction"] for r in records]
  references = [r["reference"] for r in records]
  qtypes = [r["question_type"] for r in records]
  accuracy = metrics_lib.accuracy_by_type(predictions, references, qtypes)
  blind = metrics_lib.blind_baseline(references, qtypes)
  model_cfg = setup.model.config
  text_length = int(round(np.mean(prompt_lengths))) if prompt_lengths else 1
  result = {
      "stage": int(config.stage),
      "num_examples": len(records),
      "accuracy": accuracy,
      "blind_baseline": blind,
      "num_visual_tokens": model_cfg.num_visual_tokens,
      "mean_prompt_tokens": text_length,
      "prefill_flops": efficiency.xla_prefill_flops(model_cfg, text_length,
                                                    config.data.resolution),
  }
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  if verbose:
    print(format_report(result))
  return result


def format_report(result: dict[str, Any]) -> str:
  lines = [f"stage {result['stage']}: {result['num_examples']} held-out questions, "
           f"{result['num_visual_tokens']} visual tokens, prefill "
           f"{result['prefill_flops'] / 1e6:.1f} MFLOPs ({result['mean_prompt_tokens']} "
           "prompt tokens)",
           f"  {'question type':<14}{'accuracy':>10}{'blind':>10}"]
  for qtype, acc in result["accuracy"].items():
    lines.append(f"  {qtype:<14}{acc:>10.1%}{result['blind_baseline'].get(qtype, 0):>10.1%}")
  return "\n".join(lines)
