"""Train-step benchmark for a config, per stage (prints numbers; not a test).

  python -m benchmarks.train_step [--config configs/tiny.py] [--steps 20] [--stages 1,2,3]

For each stage: compile time, steady-state step time, examples/s and tokens/s on a
synthetic batch already on device (data loading excluded), model FLOPs per step (matmuls
and convolutions of forward + backward, counted from the step's jaxpr with every scanned
layer counted; remat recomputation included), the achieved GFLOP/s and MFU against the
matmul peak measured in the same run (f32 and bf16 [2048]² matmuls; MFU uses the peak of
the config's compute dtype), plus trainable / total parameter counts and optimizer-state
bytes. Every step is blocked on, so the time is the step's own.
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_utils
from leo_mini_jax import config_files
from leo_mini_jax import config_validation
from leo_mini_jax.evaluation import workload
from leo_mini_jax.training import loop
from leo_mini_jax.training import optimizer as optimizer_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  flags.DEFINE_string("config", "configs/tiny.py", "Config file (no :arg).")
  flags.DEFINE_integer("steps", 20, "Timed steps per stage.")
  flags.DEFINE_list("stages", ["1", "2", "3"], "Stages to run.")


def bench_stage(module, stage: int, steps: int, peaks: dict[str, float]) -> dict[str, float]:
  config = module.get_config(f"stage={stage}")
  config_validation.validate_config(config, trace_model=False, init_from=False)
  setup = loop.TrainSetup(config)
  state = setup.init_state(0)
  batch = setup.global_batch(workload.synthetic_batch(config))
  train_step = setup.jit_train_step()
  start = time.perf_counter()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times, tokens = [], 0.0
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    tokens += float(metrics["tokens"])  # blocks
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  flops = bench_utils.model_flops(train_step, state, batch)
  dtype = str(config.model.llm.get("dtype", "float32"))
  params = setup.abstract_state.params
  trainable = optimizer_lib.split_trainable(params, setup.trainable)[0]
  return {
      "stage": stage,
      "compile_s": compile_s,
      "step_ms": 1e3 * step_s,
      "examples_per_s": config.data.batch_size / step_s,
      "tokens_per_s": tokens / steps / step_s,
      "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
      "total_params": sum(x.size for x in jax.tree.leaves(params)),
      "optimizer_state_bytes": optimizer_lib.count_leaves_bytes(setup.abstract_state.opt_state),
      "gflop_per_step": flops / 1e9,
      "gflops": flops / step_s / 1e9,
      "mfu": flops / step_s / peaks["bfloat16" if dtype == "bfloat16" else "float32"],
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  module = config_files.load_config_module(FLAGS.config)
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, config {FLAGS.config}")
  peaks = {"float32": bench_utils.matmul_peak(jnp.float32),
           "bfloat16": bench_utils.matmul_peak(jnp.bfloat16)}
  print(f"matmul peak: {peaks['float32'] / 1e9:.0f} GFLOP/s f32, "
        f"{peaks['bfloat16'] / 1e9:.0f} GFLOP/s bf16")
  header = (f"{'stage':>5}{'compile s':>11}{'step ms':>9}{'examples/s':>12}{'tokens/s':>10}"
            f"{'GFLOP/step':>12}{'GFLOP/s':>9}{'MFU':>6}"
            f"{'trainable':>12}{'total':>12}{'opt bytes':>12}")
  print(header)
  for stage in map(int, FLAGS.stages):
    r = bench_stage(module, stage, FLAGS.steps, peaks)
    print(f"{r['stage']:>5}{r['compile_s']:>11.1f}{r['step_ms']:>9.1f}"
          f"{r['examples_per_s']:>12.1f}{r['tokens_per_s']:>10.0f}"
          f"{r['gflop_per_step']:>12.2f}{r['gflops']:>9.1f}{r['mfu']:>6.0%}"
          f"{r['trainable_params']:>12,}{r['total_params']:>12,}"
          f"{r['optimizer_state_bytes']:>12,}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
