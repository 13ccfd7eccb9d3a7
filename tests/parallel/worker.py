"""One process of a multi-process training run on fake CPU devices (launched by tests).

  python -m tests.parallel.worker --port P --process_id I --num_processes N \
      --local_devices D --workdir DIR --steps S [--stop_at K] [--every_steps E]

Each process drives D fake CPU devices and joins the others with
jax.distributed.initialize('127.0.0.1:P', N, I); the run is `loop.train` on the small
stage-2 test config over a mesh of all N × D devices (fsdp).
"""

import argparse
import os
import sys


def main():
  parser = argparse.ArgumentParser()
  for name in ("port", "process_id", "num_processes", "local_devices", "steps"):
    parser.add_argument(f"--{name}", type=int, required=True)
  parser.add_argument("--stop_at", type=int, default=None)
  parser.add_argument("--every_steps", type=int, default=0)
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
  from tests.parallel import common  # pylint: disable=import-outside-toplevel
  from leo_mini_jax.training import loop  # pylint: disable=import-outside-toplevel
  config = common.pod_config(args.steps, args.every_steps)
  summary = loop.train(config, args.workdir, progress=False, stop_at=args.stop_at)
  print(f"process {jax.process_index()}: stopped at step {int(summary['state'].step)} "
        f"({summary['stopped']})", flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
