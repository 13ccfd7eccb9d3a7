"""Evaluates a run's latest checkpoint on the held-out split or the paper's benchmarks.

  python eval.py --config configs/tiny.py:stage=3 --workdir /tmp/leo/stage3

generates greedily with the KV cache, writes <workdir>/eval/predictions.jsonl and
metrics.json, and prints exact-match accuracy per question type beside the blind baseline.

  python eval.py --config configs/leo_mini_llama3_8b.py --workdir RUN \
      --config.eval.benchmark=mme,pope --config.eval.data_dir=/data/eval

runs the named benchmarks ('all': every one found under data_dir; see
leo_mini_jax/evaluation/benchmarks/ for each one's files, prompt and answer length). All
of them are read and checked before the first question is generated, each shows a
progress bar, and OUT/NAME/{predictions.jsonl, metrics.json, routing.json, routing.png,
submission files} and OUT/summary.md (rebuilt from every OUT/*/metrics.json; printed) are
written, OUT = --config.eval.output_dir (default RUN/eval). --config.eval.skip_bad=True
skips and counts bad records instead of stopping on them. Without --config the run's
saved config.json is used (overrides apply on top); a config that contradicts the run
(tokenizer, template, model shape) is refused, naming both values.
"""

from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from leo_mini_jax import cli
from leo_mini_jax import run_record
from leo_mini_jax import config_validation
from leo_mini_jax.evaluation import runner
from leo_mini_jax.parallel import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints inside).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise cli.UserError(f"--config is required: {_WORKDIR.value} holds no run record "
                        "(config.json)")
  run_record.check(config, _WORKDIR.value)
  mesh_lib.initialize_distributed(config.distributed)
  # The schedule is checked when runner builds the ModelRuntime; init_from is not read.
  config_validation.validate_config(config, trace_model=False, init_from=False)
  if not epath.Path(_WORKDIR.value).exists():
    raise cli.UserError(f"run not found: {_WORKDIR.value} does not exist")
  if run_record.latest_step(_WORKDIR.value) is None and run_record.record_dir(
      _WORKDIR.value) is not None:
    raise cli.UserError(f"no checkpoint in {_WORKDIR.value}/checkpoints: train it first")
  runner.evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main, saved_config=True)
