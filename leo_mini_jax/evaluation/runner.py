"""Evaluation: the held-out split of the data config, or the paper's benchmarks.

`evaluate` scores the data config's eval split (synthetic or LLaVA JSON) by exact match
when `eval.benchmark` is empty; otherwise `evaluate_benchmarks` runs the named benchmarks
(evaluation/benchmarks/) and writes, per benchmark, OUT/NAME/predictions.jsonl,
metrics.json, submission files and the routing of MMoE-LLM, then OUT/summary.md (OUT:
eval.output_dir, default RUN/eval).
"""

import contextlib
import glob
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax import run_events
from leo_mini_jax import run_record
from leo_mini_jax import runtime as runtime_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.evaluation import benchmarks as benchmarks_lib
from leo_mini_jax.evaluation import efficiency
from leo_mini_jax.evaluation import generate as generate_lib
from leo_mini_jax.evaluation import metrics as metrics_lib
from leo_mini_jax.evaluation import routing as routing_lib
from leo_mini_jax.parallel import mesh as mesh_lib


def restore_params(setup: runtime_lib.ModelRuntime, workdir: str, source: dict | None = None) -> Any:
  """The params of the workdir's latest complete checkpoint, with the setup's shardings
  (verified as on resume; `source` receives the step read)."""
  params, _ = checkpoints_lib.load_params(workdir, setup.abstract_params,
                                          source=source)
  return params


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: Any = None,
             setup: runtime_lib.ModelRuntime | None = None, verbose: bool = True) -> dict[str, Any]:
  """Generates answers for the eval split and scores them.

  Writes <workdir>/eval/predictions.jsonl and metrics.json. Returns the metrics dict.
  With `eval.benchmark` set, runs `evaluate_benchmarks` instead.
  """
  setup = setup or runtime_lib.ModelRuntime(config)
  source = {}  # which checkpoint step is scored (None: params given by the caller)
  if params is None:
    params = restore_params(setup, workdir, source)
  if config.eval.get("benchmark"):
    return evaluate_benchmarks(config, workdir, params, setup, verbose,
                               checkpoint_step=source.get("step"))
  eval_data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  eval_data_cfg.batch_size = config.eval.batch_size
  data = pipeline_lib.make_dataset(eval_data_cfg, split="eval", mode="generate")
  tokenizer, template = data.tokenizer, data.template
  stop_ids = tuple({tokenizer.eos_id, template.end_of_turn_id(tokenizer)})
  generate = jax.jit(generate_lib.make_generate(
      setup.model, int(config.eval.max_new_tokens) or generate_lib.DEFAULT_ANSWER_TOKENS,
      template.end_of_turn_id(tokenizer)))
  limit = config.eval.get("num_examples") or None
  records, prompt_lengths = [], []
  # Closed on leaving (also after `limit`'s break): grain's reader threads stop here, not
  # in a finalizer during whatever runs next.
  with mesh_lib.activate(setup.mesh, setup.rules), contextlib.closing(data.iterator()) as rows:
    for batch, meta in rows:
      tokens = generate(params, setup.global_batch(batch))["tokens"]
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
      "checkpoint_step": source.get("step"),
      "accuracy": accuracy,
      "blind_baseline": blind,
      "num_visual_tokens": model_cfg.num_visual_tokens,
      "mean_prompt_tokens": text_length,
      "prefill_flops": efficiency.xla_prefill_flops(model_cfg, text_length,
                                                    config.data.resolution),
  }
  out_dir = output_dir(config.eval, workdir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  # Beside the training curves, at the step of the checkpoint evaluated.
  run_events.write_tensorboard(workdir, run_record.latest_step(workdir) or 0, {
      f"eval/accuracy/{qtype}": value for qtype, value in accuracy.items()})
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


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)


def answer_length(cls: type, eval_cfg: ml_collections.ConfigDict) -> int:
  """eval.max_new_tokens when > 0 (one length for all), else the benchmark's own."""
  override = int(eval_cfg.get("max_new_tokens", 0) or 0)
  return override if override > 0 else int(cls.max_new_tokens)


def output_dir(eval_cfg: ml_collections.ConfigDict, workdir: str) -> str:
  return eval_cfg.get("output_dir", "") or os.path.join(workdir, "eval")


def read_benchmarks(eval_cfg: ml_collections.ConfigDict) -> list[tuple[Any, list]]:
  """Every named benchmark's files read and checked before anything is generated.

  Returns [(benchmark, samples)]. The problems of all benchmarks are raised together as
  one `BenchmarkError`; with eval.skip_bad a benchmark that cannot be read is left out
  (and named in a warning) and the others go on.
  """
  skip_bad = bool(eval_cfg.get("skip_bad", False))
  read, problems = [], []
  for cls, folder in benchmarks_lib.resolve(eval_cfg.benchmark, eval_cfg.data_dir):
    bench = cls(folder, skip_bad=skip_bad, split=eval_cfg.get("split", ""))
    try:
      samples = bench.samples()
    except benchmarks_lib.BenchmarkError as e:
      problems.append(str(e))
      continue
    if eval_cfg.get("num_examples"):
      samples = samples[:int(eval_cfg.num_examples)]
    read.append((bench, samples))
    if bench.report.skipped:
      logging.warning("%s", bench.report.summary())
  if problems and (not skip_bad or not read):
    raise benchmarks_lib.BenchmarkError(
        f"{len(problems)} benchmark(s) cannot be read:\n  - " + "\n  - ".join(problems))
  for problem in problems:
    logging.warning("left out: %s", problem)
  return read


def evaluate_benchmarks(config: ml_collections.ConfigDict, workdir: str, params: Any,
                        setup: runtime_lib.ModelRuntime, verbose: bool = True,
                        checkpoint_step: int | None = None) -> dict[str, Any]:
  """Runs `eval.benchmark` ('mme,pope', 'all') from `eval.data_dir`; returns
  {name: metrics}. Every process generates its share; process 0 writes the files under
  eval.output_dir (default RUN/eval) and rebuilds its summary.md from every
  */metrics.json there."""
  eval_cfg = config.eval
  writer = jax.process_index() == 0
  tokenizer = tokenizers_lib.load_tokenizer(config.data.tokenizer)
  template = pipeline_lib.resolve_template(config.data, tokenizer)
  stop_ids = tuple({tokenizer.eos_id, template.end_of_turn_id(tokenizer)})
  resolution, mean_rgb = int(config.data.resolution), tuple(config.data.image_mean_rgb)
  aspect = config.data.get("image_aspect", "pad")
  limits = images_lib.limits_from_config(config.data)
  load_image = lambda source: images_lib.to_master_resolution(source, resolution, mean_rgb,
                                                              aspect, limits)
  eval_dir = output_dir(eval_cfg, workdir)
  benches = read_benchmarks(eval_cfg)
  generator = generate_lib.BatchGenerator(
      setup, max_new_tokens=generate_lib.DEFAULT_ANSWER_TOKENS, eos_id=template.end_of_turn_id(tokenizer),
      routing=bool(eval_cfg.get("routing", True)))
  results, routing_panels = {}, {}
  for bench, samples in benches:
    started = time.perf_counter()
    prompts = [generate_lib.Prompt(generate_lib.build_prompt(
        s.prompt, tokenizer, template, s.image is not None), s.image) for s in samples]
    names = [f"{bench.title}: {s.source}: record {s.id}" for s in samples]
    with progress_bar(bench.title, len(prompts), writer and verbose) as progress:
      generation = generator(params, prompts, batch_size=int(eval_cfg.batch_size),
                             resolution=resolution, load_image=load_image,
                             pad_id=tokenizer.pad_id, names=names, progress=progress,
                             max_new_tokens=answer_length(type(bench), eval_cfg))
    failed = dict(generation.failed)
    if failed and not eval_cfg.get("skip_bad", False):
      index, reason = generation.failed[0]
      raise benchmarks_lib.BenchmarkError(
          f"{names[index]}: {reason} (eval.skip_bad=True skips bad records)")
    answers = generate_lib.decode_answers(np.stack(generation.tokens), tokenizer, stop_ids)
    records = []
    for index, (sample, answer) in enumerate(zip(samples, answers)):
      if index in failed:
        bench.report.skipped.append((sample.source, sample.id, failed[index]))
        continue
      records.append({"id": sample.id, "prompt": sample.prompt, "prediction": answer,
                      "target": sample.target})
    scored = [r for r in records if "answers" in r["target"]]
    metrics = bench.score(scored) if scored else {"score": None, "num_questions": 0}
    seconds = time.perf_counter() - started
    metrics.update(checkpoint_step=checkpoint_step,
                   num_generated=len(records), num_skipped=len(bench.report.skipped),
                   skipped=[list(s) for s in bench.report.skipped[:100]],
                   max_new_tokens=answer_length(type(bench), eval_cfg),
                   seconds=round(seconds, 1),
                   num_visual_tokens=setup.model.config.num_visual_tokens)
    if verbose and writer:
      print(f"{bench.title}: {len(records)} questions in {seconds:.1f} s")
    out_dir = os.path.join(eval_dir, bench.name)
    if writer:
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for record in records:
          f.write(json.dumps(record) + "\n")
      metrics["submission_files"] = bench.write_submission(records, out_dir)
      if generation.routing is not None:
        routing_lib.write_routing(out_dir, bench.title, generation.routing)
        routing_panels[bench.title] = routing_lib.fractions(generation.routing)
      _write_json(os.path.join(out_dir, "metrics.json"), metrics)
    results[bench.name] = metrics
  run_events.write_tensorboard(workdir, run_record.latest_step(workdir) or 0, {
      f"eval/{name}/score": metrics["score"] for name, metrics in results.items()})
  if writer:
    summary = format_summary(collect_metrics(eval_dir),
                             setup.model.config.num_visual_tokens)
    with open(os.path.join(eval_dir, "summary.md"), "w") as f:
      f.write(summary + "\n")
    if routing_panels:
      routing_lib.plot_panels(routing_panels, os.path.join(eval_dir, "routing.png"),
                              "MMoE-LLM routing (fraction of prompt tokens per expert)")
    if verbose:
      print(summary)
  return results


@contextlib.contextmanager
def progress_bar(title: str, total: int, show: bool):
  """A tqdm bar (questions done / total, rate, ETA) fed by BatchGenerator's callback."""
  if not show:
    yield None
    return
  import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm.tqdm(total=total, desc=title, unit="q", leave=True, dynamic_ncols=True) as bar:
    yield lambda done, _: bar.update(done - bar.n)


def collect_metrics(eval_dir: str) -> dict[str, dict]:
  """{benchmark: metrics} of every <eval_dir>/<name>/metrics.json of a known benchmark
  (earlier invocations' included)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(eval_dir, "*", "metrics.json"))):
    name = os.path.basename(os.path.dirname(path))
    if name not in benchmarks_lib.REGISTRY:
      continue
    try:
      with open(path) as f:
        out[name] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      logging.warning("summary leaves out %s: %s", path, e)
  return out


def format_summary(results: dict[str, dict], num_visual_tokens: int) -> str:
  """A markdown table of every benchmark run, in the paper's column order (Table 3; the
  benchmarks outside the paper's tables after them)."""
  names = [n for n in benchmarks_lib.names() if n in results]
  titles = [benchmarks_lib.REGISTRY[n].title for n in names]
  cell = lambda v: "—" if v is None else f"{v:.1f}"
  lines = ["| # V tokens | " + " | ".join(titles) + " |",
           "|---:|" + "---:|" * len(names),
           f"| {num_visual_tokens} | " + " | ".join(cell(results[n].get("score"))
                                                    for n in names)
           + " |"]
  skipped = {benchmarks_lib.REGISTRY[n].title: results[n]["num_skipped"] for n in names
             if results[n].get("num_skipped")}
  if skipped:
    lines.append("")
    lines.append("Skipped bad records: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
  return "\n".join(lines)
