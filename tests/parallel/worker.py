"""One process of a multi-process training run on fake CPU devices (launched by tests).

  python -m tests.parallel.worker --port P --process_id I --num_processes N \
      --local_devices D --workdir DIR --steps S --train_json JSON [--every_steps E]

Each process drives D fake CPU devices and joins the others through the config's
`distributed` fields (coordinator 127.0.0.1:P), as train.py does; the run is `loop.train`
on the small stage-2 test config (tests.parallel.common.pod_config) over a mesh of all
N × D devices (fsdp). It writes DIR/reads-I.json (the image files this process opened,
see common.spy_reads) and prints 'process I: preempted; saved step S' (train.py's words)
or 'process I: stopped at step S (done)'.
"""

import argparse
import json
import os
import sys


def main():
  parser = argparse.ArgumentParser()
  for name in ("port", "process_id", "num_processes", "local_devices", "steps"):
    parser.add_argument(f"--{name}", type=int, required=True)
  parser.add_argument("--every_steps", type=int, default=0)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--train_json", required=True)
  args = parser.parse_args()
  # Before jax is imported (the imports below import it).
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  # pylint: disable=import-outside-toplevel
  import jax
  from leo_mini_jax.parallel import mesh as mesh_lib
  from leo_mini_jax.training import loop
  from tests.parallel import common
  # pylint: enable=import-outside-toplevel
  config = common.pod_config(args.steps, args.train_json, args.every_steps)
  config.distributed.coordinator_address = f"127.0.0.1:{args.port}"
  config.distributed.num_processes = args.num_processes
  config.distributed.process_id = args.process_id
  assert mesh_lib.initialize_distributed(config.distributed)
  with common.spy_reads() as reads:
    summary = loop.train(config, args.workdir, progress=False)
  with open(os.path.join(args.workdir, f"reads-{jax.process_index()}.json"), "w") as f:
    json.dump(reads, f)
  step = int(summary["state"].step)
  if summary["stopped"] == "preempted":
    print(f"process {jax.process_index()}: preempted; saved step {step}", flush=True)
  else:
    print(f"process {jax.process_index()}: stopped at step {step} ({summary['stopped']})",
          flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
