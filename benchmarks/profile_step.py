"""Where a train step's time goes: a `jax.profiler` trace, summed per model component.

  python -m benchmarks.profile_step [--config configs/tiny.py | --size small] [--stage 2]
      [--steps 5] [--depth 3] [--top 15] [--trace_dir /tmp/leo_mini_profile]

Traces --steps steady-state steps on a device-resident synthetic batch, then attributes
every executed XLA op (thunk on CPU, kernel on GPU) to the source of the HLO instruction
it ran: the instruction's `op_name` metadata, cut to --depth module levels with the
transformations and wrappers removed (e.g. `encode_images/vision/convnext`). Prints per
component the ms per step, its share of the ops' total, the op count, and how many ops
were "memory-bound" (fusions and copies, not matmuls or convolutions); ops outside the
model (loss, optimizer update, non-finite guard) form one group, and ops XLA added
without a source (copies, broadcasts) another. Then the --top individual ops. The trace
stays in --trace_dir for TensorBoard / Perfetto.

Control-flow ops (while, call, conditional) contain the ops they run, so only the ops
inside them are counted. On CPU, ops of one step can run on two threads at once, so the
per-step total may exceed the step's wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

from absl import logging
import jax

from benchmarks import steps as steps_bench
from leo_mini_jax import config_files
from leo_mini_jax.evaluation import workload
from leo_mini_jax.training import loop

CONTAINERS = ("while", "call", "conditional", "ThunkExecutor", "PjitFunction", "$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"")
# jit(guarded)/jvp(LeoMini)/vision/... and transpose(jvp(LeoMini))/...: keep the modules.
_TRANSFORM = re.compile(r"^(?:[\w\-]+\()+([\w\-]+)\)+")
# Ops that are matmuls / convolutions on XLA:CPU and GPU (the rest is memory-bound work).
_COMPUTE = re.compile(r"dot|conv|gemm|cublas|cudnn|matmul|ynn_fusion|onednn")


def op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name → op_name metadata, for every instruction that has one."""
  sources = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      sources[match.group(1)] = match.group(2)
  return sources


# Wrappers that say nothing about which module ran.
_SKIP = {"LeoMini", "LeoMini._inputs", "llm.forward", "while", "body", "cond", "closed_call",
         "checkpoint", "remat", "rematted_computation"}
OUTSIDE_MODEL = "(loss, optimizer, guard)"
NO_SOURCE = "(no source)"


def component(op_name: str, depth: int) -> str:
  """The module path of an op, `depth` levels deep; the backward pass of a module counts
  with its forward. 'jit(guarded)/transpose(jvp(LeoMini))/llm.forward/llm.decoder/while/
  body/closed_call/layers/mlp/dot_general' → 'llm.decoder/layers/mlp' at depth 3."""
  modules = []
  for part in op_name.split("/")[1:-1]:  # [0]: the jitted function; [-1]: the primitive
    match = _TRANSFORM.match(part)
    part = match.group(1) if match else part
    if part in _SKIP or "(" in part or not part:
      continue
    modules.append(part.removeprefix("LeoMini."))
  return "/".join(modules[:depth]) if modules else OUTSIDE_MODEL


def leaf_events(trace_dir: str) -> list[dict]:
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not path:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(path[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(CONTAINERS)]


def profile(config, steps: int, trace_dir: str):
  setup = loop.TrainSetup(config)
  state = setup.init_state(0)
  batch = setup.global_batch(workload.synthetic_batch(config))
  train_step = setup.jit_train_step()
  compiled = train_step.lower(state, batch).compile()
  sources = op_sources(compiled.as_text())
  for _ in range(3):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  return leaf_events(trace_dir), sources


def summarize(events: list[dict], sources: dict[str, str], depth: int, steps: int):
  """Per component [ms per step, ops, memory-bound ops], and ms per step per (op, source)."""
  per_component = collections.defaultdict(lambda: [0.0, 0, 0])
  per_op = collections.Counter()
  for event in events:
    name = event["name"]
    source = sources.get(name, "")
    ms = event.get("dur", 0) / 1e3 / steps
    entry = per_component[component(source, depth) if source else NO_SOURCE]
    entry[0] += ms
    entry[1] += 1
    entry[2] += 0 if _COMPUTE.search(name) else 1
    per_op[(name, source)] += ms
  return dict(per_component), per_op


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/tiny.py", help="Config file (no :arg).")
  parser.add_argument("--size", choices=("tiny", "small"),
                      help="Instead of --config: the model of benchmarks.components's size.")
  parser.add_argument("--stage", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="Traced steps.")
  parser.add_argument("--depth", type=int, default=3, help="Module levels to group by.")
  parser.add_argument("--top", type=int, default=15, help="Individual ops to list.")
  parser.add_argument("--trace_dir", default="/tmp/leo_mini_profile")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  if args.size:
    size = steps_bench.SIZES[args.size]
    config = steps_bench.model_config(size, args.stage, size["batch"])
  else:
    config = config_files.load_config_module(args.config).get_config(f"stage={args.stage}")
  events, sources = profile(config, args.steps, args.trace_dir)
  steps = args.steps
  per_component, per_op = summarize(events, sources, args.depth, steps)
  total = sum(v[0] for v in per_component.values())
  print(f"{args.size or args.config} stage {args.stage}: {total:.1f} ms of ops per step "
        f"({jax.devices()[0].device_kind})")
  print(f"{'component':<48}{'ms/step':>9}{'share':>7}{'ops':>7}{'memory-bound':>14}")
  for group, (ms, count, memory) in sorted(per_component.items(), key=lambda kv: -kv[1][0]):
    print(f"{group[:47]:<48}{ms:>9.2f}{ms / total:>7.1%}{count // steps:>7}"
          f"{memory // steps:>14}")
  print(f"\ntop {args.top} ops")
  for (name, source), ms in per_op.most_common(args.top):
    print(f"{ms:>8.2f} ms  {name:<32} {source[-90:]}")


if __name__ == "__main__":
  main()
