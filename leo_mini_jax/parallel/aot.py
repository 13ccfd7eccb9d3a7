"""The real train step compiled ahead of time for a target: per-device memory, fits.

`measure` builds the run's TrainSetup on the target's mesh (state shardings come from
`jax.eval_shape`, so no weight is allocated), lowers the jitted train step on
ShapeDtypeStruct inputs that carry their shardings, compiles it with the target's own
compiler and reads `compiled.memory_analysis()`:

  params      the train state's parameters (this device's shards)
  optimizer   Adam moments and counters (this device's shards)
  batch       the input batch shard
  temp        the compiler's temporary buffers: activations kept for the backward pass,
              gradients, collectives' buffers, workspace (libtpu reports 0: read peak)
  total       arguments + temp + non-aliased outputs: what the step needs resident
  peak        the compiler's own peak estimate where it reports one (TPU, GPU)

On fake CPU devices the numbers are XLA:CPU's buffer assignment (estimates within tens
of percent); on a TPU or GPU target they are that compiler's. `fit` searches the
smallest gradient accumulation (and optionally a stronger remat policy) that fits.
"""

import copy
import math
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from leo_mini_jax import config_validation
from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.parallel import targets as targets_lib
from leo_mini_jax.training import loop

# LLM remat policies from the most memory kept to the least.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


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


def target_mesh(config: ml_collections.ConfigDict, target: targets_lib.Target,
                shape: dict | None = None):
  """The config's mesh (or `shape`, sizes within a slice) over the target's devices.

  A multi-slice target joins its slices over the config's `mesh.dcn` where that has
  as many slices, else over 'data'.
  """
  shape = dict(shape) if shape else {k: config.mesh[k] for k in mesh_lib.MESH_AXES}
  slices = len({getattr(d, "slice_index", 0) for d in target.devices})
  dcn = None
  if slices > 1:
    dcn = dict(config.mesh.get("dcn") or {})
    if math.prod(int(v) for v in dcn.values()) != slices:
      dcn = {"data": slices}
  return mesh_lib.make_mesh(shape, devices=target.devices, dcn=dcn)


def lower_train_step(config: ml_collections.ConfigDict, mesh):
  """(TrainSetup, abstract batch, Lowered) for the config's train step on `mesh`."""
  config_validation.validate_config(config, device_count=0, trace_model=False,
                                    init_from=False)  # the mesh is the target's
  platform = mesh.devices.flat[0].platform
  with attention_lib.compile_target(platform):
    setup = loop.TrainSetup(config, mesh)
    loop.check_batch(config, mesh, process_count=1)
    batch = setup.abstract_batch()
    lowered = setup.jit_train_step().lower(setup.abstract_state, batch)
  return setup, batch, lowered


def _fits(total: int, peak: int | None, memory: int | None) -> bool | None:
  if memory is None:
    return None
  return (peak or total) <= memory


def measure(config: ml_collections.ConfigDict, mesh, top: int = 6,
            target: targets_lib.Target | None = None,
            on_compiled: Callable | None = None) -> dict:
  """Compiles the train step for `mesh` (on `target`'s devices) and returns the numbers.

  `on_compiled` receives the compiled executable (to read its HLO text). A TPU program
  over the chip's memory is a compile error there: the row says fits=False with the
  compiler's message and no byte counts.
  """
  start = time.perf_counter()
  setup, batch, lowered = lower_train_step(config, mesh)
  row = {
      "target": target.name if target else f"cpu x{mesh.size}",
      "device_kind": mesh.devices.flat[0].device_kind,
      "memory": target.memory_bytes if target else None,
      "compiler": target.compiler if target else "XLA:CPU",
      "devices": mesh.size, "mesh": dict(mesh.shape), "stage": int(config.stage),
      "batch_size": int(config.data.batch_size),
      "grad_accum_steps": int(config.optimizer.grad_accum_steps),
      "max_length": int(config.data.max_length),
      # Packed rows hold several examples and up to this many images (each a tower pass).
      "images_per_row": (int(config.data.get("max_images_per_row", 1))
                         if config.data.get("packing") else 1),
      "remat_policy": config.model.llm.get("remat_policy", "none"),
      "vision_passes": int(config.model.get("vision_passes", 1)),
      "loss_chunk_length": int((config.get("train") or {}).get("loss_chunk_length", 0)),
      "params": shard_bytes(setup.abstract_state.params),
      "optimizer": shard_bytes(setup.abstract_state.opt_state),
      "batch": shard_bytes(batch),
      "largest": largest_arrays(setup.abstract_state, top),
  }
  try:
    compiled = lowered.compile(
        compiler_options=(target.compiler_options or None) if target else None)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    row.update(fits=False, error=str(e).strip().splitlines()[0][:400],
               compile_seconds=time.perf_counter() - start)
    return row
  if on_compiled is not None:
    on_compiled(compiled)
  memory = compiled.memory_analysis()
  arguments = int(memory.argument_size_in_bytes)
  temp = int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  total = arguments + temp + max(outputs, 0)
  peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0) or None  # None: not reported
  row.update(arguments=arguments, temp=temp, outputs_not_aliased=outputs, total=total,
             peak=peak, fits=_fits(total, peak, row["memory"]),
             compile_seconds=time.perf_counter() - start)
  return row


def accumulation_choices(config: ml_collections.ConfigDict, mesh) -> list[int]:
  """Gradient accumulations whose micro-batches split over the data-parallel devices."""
  batch = int(config.data.batch_size)
  parallel = mesh_lib.data_parallel_size(mesh)
  return [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % parallel == 0]


def _walk_from(choices: list[int], start: int, fits: Callable[[int], dict | None]):
  """The smallest fitting accumulation, walking from `start` (a good guess: 2 compiles).

  Fits at `start`: step down until one does not; else step up until one fits.
  """
  index = min(range(len(choices)), key=lambda i: abs(choices[i] - start))
  best = fits(choices[index])
  if best is None:
    for accum in choices[index + 1:]:
      best = fits(accum)
      if best is not None:
        return best
    return None
  for accum in reversed(choices[:index]):
    row = fits(accum)
    if row is None:
      break
    best = row
  return best


def _binary_search(choices: list[int], fits: Callable[[int], dict | None]):
  """The smallest fitting accumulation (memory falls as accumulation grows)."""
  low, high, best = 0, len(choices) - 1, None
  while low <= high:
    middle = (low + high) // 2
    row = fits(choices[middle])
    if row is not None:
      best, high = row, middle - 1
    else:
      low = middle + 1
  return best


def fit(config: ml_collections.ConfigDict, mesh, target: targets_lib.Target,
        try_remat: bool = False, report: Callable[[dict], None] = lambda row: None,
        measure_fn: Callable = measure, start: int | None = None) -> dict | None:
  """The first (remat policy, smallest accumulation) whose step fits the target.

  Memory falls as accumulation grows, so each policy is a binary search over the
  accumulations the batch allows, or, given `start` (a guess, e.g. from a smaller
  compile), a walk from it; `report` sees every compiled try. Policies: the config's,
  then (with `try_remat`) each that keeps less, in REMAT_ORDER. Returns the fitting
  row, or None.
  """
  if target.memory_bytes is None:
    raise ValueError(f"target {target.name}: its memory is unknown, nothing to fit")
  policy = config.model.llm.get("remat_policy", "none")
  policies = [policy]
  if try_remat and policy in REMAT_ORDER:
    policies += list(REMAT_ORDER[REMAT_ORDER.index(policy) + 1:])
  choices = accumulation_choices(config, mesh)
  for remat in policies:
    def fits(accum, remat=remat):
      trial = copy.deepcopy(config)
      trial.model.llm["remat_policy"] = remat
      trial.optimizer.grad_accum_steps = accum
      row = measure_fn(trial, mesh, 0, target)
      report(row)
      return row if row["fits"] else None
    best = (_walk_from(choices, start, fits) if start
            else _binary_search(choices, fits))
    if best is not None:
      return best
  return None
