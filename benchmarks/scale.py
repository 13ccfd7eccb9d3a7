"""Per-device memory of the real train step at any scale, from abstract shapes only.

  python benchmarks/scale.py --config configs/leo_mini_llama3_8b.py:stage=2 \
      --devices 64 --mesh fsdp=-1 [--config.optimizer.grad_accum_steps=4] [--json out.jsonl]

Sets up `--devices` fake CPU devices, builds the run's TrainSetup (the state's shardings
come from `jax.eval_shape`, so no weight is allocated), lowers and compiles the jitted
train step on ShapeDtypeStruct inputs that carry their shardings, and prints per-device
bytes from `compiled.memory_analysis()`:

  params      the train state's parameters (this device's shards)
  optimizer   Adam moments and counters (this device's shards)
  batch       the input batch shard
  temp        XLA's temporary buffers: activations kept for the backward pass,
              gradients, collectives' buffers, workspace
  total       arguments + temp + non-aliased outputs: what the step needs resident

and the largest state arrays with their sharding. The numbers are XLA:CPU's buffer
assignment for the same SPMD program a TPU or GPU compiles; the accelerator compilers
fuse differently, so treat them as estimates (within tens of percent), not limits.
Any config field can be overridden with --config.<field>=value.
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leo_mini_jax import config_validation
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                          lock_config=False)
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. 'fsdp=-1' or 'fsdp=32,tensor=2' "
                            "(default: the config's mesh).")
_TOP = flags.DEFINE_integer("top", 6, "Largest state arrays to list.")
_JSON = flags.DEFINE_string("json", "", "Append the result as one JSON line to this file.")
flags.mark_flags_as_required(["config"])

GIB = 2.0**30


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=-1,tensor=2' → {'fsdp': -1, 'tensor': 2}; unnamed axes are 1."""
  sizes = dict.fromkeys(mesh_lib.MESH_AXES, 1)
  for item in filter(None, text.split(",")):
    axis, sep, value = item.partition("=")
    if not sep or axis.strip() not in sizes:
      raise ValueError(f"--mesh {item!r}: expected axis=size with axis in {sorted(sizes)}")
    sizes[axis.strip()] = int(value)
  return sizes


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "sharding") and leaf.sharding is not None:
      shape = leaf.sharding.shard_shape(leaf.shape)
      total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _path(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def largest_arrays(abstract_state, count: int) -> list[dict]:
  """The `count` state arrays with the most bytes per device, with their sharding."""
  rows = []
  for group in ("params", "opt_state"):
    for path, x in jax.tree_util.tree_leaves_with_path(getattr(abstract_state, group)):
      if getattr(x, "sharding", None) is None:
        continue
      per_device = math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      rows.append({"array": f"{group}/{_path(path)}", "shape": tuple(x.shape),
                   "dtype": str(x.dtype), "spec": str(x.sharding.spec),
                   "per_device": per_device})
  rows.sort(key=lambda r: -r["per_device"])
  return rows[:count]


def human(num_bytes: float) -> str:
  return (f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 4
          else f"{num_bytes / 2**20:.1f} MiB")


def measure(config, mesh, top: int = 6) -> dict:
  """Compiles the train step for `mesh` and returns the per-device numbers."""
  start = time.perf_counter()
  config_validation.validate_config(config, device_count=0, trace_model=False,
                                    init_from=False)  # the mesh is --mesh's
  setup = loop.TrainSetup(config, mesh)
  loop.check_batch(config, mesh, process_count=1)
  batch = setup.abstract_batch()
  lowered = setup.jit_train_step().lower(setup.abstract_state, batch)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  params = shard_bytes(setup.abstract_state.params)
  optimizer = shard_bytes(setup.abstract_state.opt_state)
  batch_bytes = shard_bytes(batch)
  arguments = int(memory.argument_size_in_bytes)
  temp = int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  return {
      "devices": mesh.size, "mesh": dict(mesh.shape), "stage": int(config.stage),
      "batch_size": int(config.data.batch_size),
      "grad_accum_steps": int(config.optimizer.grad_accum_steps),
      "max_length": int(config.data.max_length),
      "remat_policy": config.model.llm.get("remat_policy", "none"),
      "params": params, "optimizer": optimizer, "batch": batch_bytes,
      "arguments": arguments, "temp": temp, "outputs_not_aliased": outputs,
      "total": arguments + temp + max(outputs, 0),
      "compile_seconds": seconds,
      "largest": largest_arrays(setup.abstract_state, top),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  config = _CONFIG.value
  shape = parse_mesh(_MESH.value) if _MESH.value else {
      k: config.mesh[k] for k in mesh_lib.MESH_AXES}
  mesh = mesh_lib.make_mesh(shape)
  result = measure(config, mesh, _TOP.value)
  print(f"{result['devices']} devices, mesh {result['mesh']}, stage {result['stage']}, "
        f"global batch {result['batch_size']} (accum {result['grad_accum_steps']}), "
        f"max_length {result['max_length']}, llm remat {result['remat_policy']}, "
        f"compiled in {result['compile_seconds']:.0f} s")
  print("per device:  " + "  ".join(
      f"{name} {human(result[name])}"
      for name in ("params", "optimizer", "batch", "temp", "total")))
  print(f"{'largest state arrays':<64}{'shape':>22}{'dtype':>10}  {'spec':<28}{'MiB/dev':>9}")
  for row in result["largest"]:
    print(f"{row['array'][-64:]:<64}{str(row['shape']):>22}{row['dtype']:>10}  "
          f"{row['spec']:<28}{row['per_device'] / 2**20:>9.1f}")
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps({k: v for k, v in result.items()}) + "\n")


if __name__ == "__main__":
  app.run(main)
