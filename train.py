"""Trains LEO-MINI from an ml_collections config.

  python train.py --config configs/tiny.py:stage=1 --workdir /tmp/leo/stage1
  python train.py --config configs/tiny.py:stage=3 --workdir /tmp/leo/stage3 \
      --config.init_from=/tmp/leo/stage2

Any config field can be overridden: --config.optimizer.lr=2e-5. The first start writes
the resolved config into the workdir (config.json, run.json). Re-running with the same
workdir resumes from its latest checkpoint (on any mesh and process count); --config may
then be left out (the saved one is used, overrides apply on top), and a config with
another tokenizer, template or model shape is refused. A finished run says so and exits.

Multi-host: --config.distributed.multi_host=true makes every process call
jax.distributed.initialize (coordinator and process ids from the platform on TPU pods,
SLURM and Open MPI, or from --config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I). The workdir may
be a gs:// path. SIGTERM saves a checkpoint at the step reached and exits with status 0.
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from leo_mini_jax import cli
from leo_mini_jax import run_record
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise cli.UserError(f"--config is required: {_WORKDIR.value} holds no run record "
                        "(config.json) to resume from")
  run_record.check(config, _WORKDIR.value)
  done = run_record.latest_step(_WORKDIR.value)
  target = run_record.planned_steps(config, _WORKDIR.value)
  if done is not None and target is not None and done >= target:
    print(f"stage {config.stage}: {_WORKDIR.value} is finished (step {done} of "
          f"{target}); nothing to do. Raise --config.total_steps to train on, "
          "or use another workdir")
    return
  mesh_lib.setup_runtime(config)
  summary = loop.train(config, _WORKDIR.value)
  final = summary["final"]
  if summary["stopped"] == "preempted":
    print(f"stage {config.stage}: preempted; saved step {int(summary['state'].step)}")
    return
  logging.info("done: %s", {k: round(v, 4) for k, v in final.items()
                            if not k.startswith("routing/")})
  print(f"stage {config.stage}: step {summary['total_steps']} loss {final.get('loss', float('nan')):.4f} "
        f"token accuracy {final.get('token_accuracy', float('nan')):.3f}")


if __name__ == "__main__":
  cli.run(main, saved_config=True)
