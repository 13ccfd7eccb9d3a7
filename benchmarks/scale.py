"""Per-device memory of the real train step for a target, compiled from abstract shapes.

  # fake CPU devices (XLA:CPU's estimate)
  python -m benchmarks.scale --config configs/leo_mini_llama3_8b.py:stage=2 \\
      --devices 64 --mesh fsdp=-1 [--config.optimizer.grad_accum_steps=4]
  # a TPU topology, by libtpu's name (v4, v5e, v5p, v6e), with the TPU compiler
  python -m benchmarks.scale --config ... --topology v5e:8x8 [--slices 2] [--chip_config megacore]
  # NVIDIA GPUs: 'slices x hosts x GPUs per host', with the CUDA compiler
  python -m benchmarks.scale --config ... --gpu h100 --topology 1x8x8
  # the smallest gradient accumulation (and with --fit_remat, remat policy) that fits
  python -m benchmarks.scale --config ... --topology v5e:8x8 --fit [--fit_remat] [--fit_start 16]

TPU and GPU targets need requirements-aot.txt's packages (no accelerator needed). Each
row prints the device kind, per-device params / optimizer / temporaries / total, the
compiler's peak where it reports one, the device's memory and whether the step fits.
`--json FILE` appends each row as one JSON line. Any config field can be overridden
with --config.<field>=value. The library part is leo_mini_jax.parallel.aot / targets.
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import jax

from leo_mini_jax.parallel import aot
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.parallel import targets

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                  lock_config=False)
  flags.DEFINE_integer("devices", 8, "Fake CPU devices (no --topology).")
  flags.DEFINE_string("topology", "", "TPU topology ('v5e:8x8') or, with --gpu, "
                      "'slices x hosts x GPUs per host' ('1x8x8').")
  flags.DEFINE_enum("gpu", "", ["", *targets.GPU_SPECS], "Compile for these GPUs.")
  flags.DEFINE_string("chip_config", "default", "libtpu chip config "
                      "('default', 'megacore').")
  flags.DEFINE_integer("slices", 1, "TPU slices joined over DCN.")
  flags.DEFINE_string("mesh", "", "Mesh sizes within a slice, e.g. 'fsdp=-1' or "
                      "'fsdp=32,tensor=2' (default: the config's mesh).")
  flags.DEFINE_bool("fit", False, "Search the smallest grad accumulation that fits.")
  flags.DEFINE_integer("fit_start", 0, "With --fit: walk from this accumulation (a "
                       "guess) instead of a binary search; 2 compiles when it is right.")
  flags.DEFINE_bool("fit_remat", False, "With --fit: also try stronger LLM "
                    f"remat policies, in the order {aot.REMAT_ORDER}.")
  flags.DEFINE_integer("top", 6, "Largest state arrays to list.")
  flags.DEFINE_string("json", "", "Append each result as one JSON line to this file.")
  flags.mark_flags_as_required(["config"])


GIB = 2.0**30
# Kept for callers of the former module-level helpers.
measure = aot.measure
shard_bytes = aot.shard_bytes
largest_arrays = aot.largest_arrays


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=-1,tensor=2' → {'fsdp': -1, 'tensor': 2}; unnamed axes are 1."""
  sizes = dict.fromkeys(mesh_lib.MESH_AXES, 1)
  for item in filter(None, text.split(",")):
    axis, sep, value = item.partition("=")
    if not sep or axis.strip() not in sizes:
      raise ValueError(f"--mesh {item!r}: expected axis=size with axis in {sorted(sizes)}")
    sizes[axis.strip()] = int(value)
  return sizes


def human(num_bytes: float | None) -> str:
  if num_bytes is None:  # not reported (a TPU over budget; no memory for fake CPUs)
    return "-"
  return (f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 4
          else f"{num_bytes / 2**20:.1f} MiB")


def verdict(row: dict) -> str:
  return {True: "fits", False: "does not fit", None: "-"}[row["fits"]]


def print_row(row: dict) -> None:
  print(f"{row['target']} ({row['device_kind']}), {row['devices']} devices, mesh "
        f"{row['mesh']}, stage {row['stage']}, global batch {row['batch_size']} (accum "
        f"{row['grad_accum_steps']}), max_length {row['max_length']}, llm remat "
        f"{row['remat_policy']}, compiled by {row.get('compiler', '?')} in "
        f"{row['compile_seconds']:.0f} s")
  print("per device:  " + "  ".join(
      f"{name} {human(row.get(name))}"
      for name in ("params", "optimizer", "batch", "temp", "total", "peak", "memory"))
      + f"  -> {verdict(row)}")
  if row.get("error"):
    print(f"  compiler: {row['error']}")


def write_json(row: dict) -> None:
  if FLAGS.json:
    with open(FLAGS.json, "a") as f:
      f.write(json.dumps(row) + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  targets.use_host_cpu()
  if not (FLAGS.topology or FLAGS.gpu):
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  target = targets.make_target(FLAGS.topology, FLAGS.gpu, FLAGS.devices,
                               FLAGS.chip_config, FLAGS.slices)
  config = FLAGS.config
  mesh_sizes = parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
  mesh = aot.target_mesh(config, target, mesh_sizes)
  if FLAGS.fit:
    def report(row):
      print_row(row)
      write_json(row)
    best = aot.fit(config, mesh, target, try_remat=FLAGS.fit_remat, report=report,
                   start=FLAGS.fit_start or None)
    print("fit: " + (f"grad_accum_steps={best['grad_accum_steps']} remat_policy="
                     f"{best['remat_policy']}" if best else "nothing tried fits"))
    return
  row = aot.measure(config, mesh, FLAGS.top, target)
  print_row(row)
  print(f"{'largest state arrays':<64}{'shape':>22}{'dtype':>10}  {'spec':<28}{'MiB/dev':>9}")
  for item in row["largest"]:
    print(f"{item['array'][-64:]:<64}{str(item['shape']):>22}{item['dtype']:>10}  "
          f"{item['spec']:<28}{item['per_device'] / 2**20:>9.1f}")
  write_json(row)


if __name__ == "__main__":
  define_flags()
  app.run(main)
