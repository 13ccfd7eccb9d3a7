"""Evaluates a run's latest checkpoint on the held-out split.

  python eval.py --config configs/tiny.py:stage=3 --workdir /tmp/leo/stage3

Generates greedily with the KV cache, writes <workdir>/eval/predictions.jsonl and
metrics.json, and prints exact-match accuracy per question type beside the blind baseline.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from leo_mini_jax.evaluation import runner
from leo_mini_jax.parallel import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints inside).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  mesh_lib.initialize_distributed(config.distributed)
  runner.evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
