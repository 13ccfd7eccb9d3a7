"""Devices to compile for without having them: fake CPUs, TPU topologies, NVIDIA GPUs.

  target = targets.make_target(topology="v5e:8x8")              # libtpu's compiler
  target = targets.make_target(gpu="h100", topology="1x8x8")     # the CUDA plugin's
  target = targets.make_target(devices=8)                        # fake CPU devices

A target's devices build a `Mesh` like real ones; lowering on ShapeDtypeStructs sharded
over it and `.compile()` run the real accelerator compiler, whose `memory_analysis()`
gives per-device bytes (and RESOURCE_EXHAUSTED where a TPU program does not fit).

Packages: `libtpu` at the version jax pins (its `tpu` extra) for TPUs;
`jax-cuda12-plugin` + `jax-cuda12-pjrt` at jax's version for GPUs (requirements-aot.txt).
The host must run with `jax_platforms='cpu'` (`use_host_cpu()` before any jax call), or
jax would try to start the TPU / CUDA runtimes this machine does not have.
"""

import dataclasses
import glob
import importlib.metadata
import os
import re

import jax

GIB = 2**30
_SPECS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# GpuTargetConfigProto text per GPU name (from XLA's target_config/specs).
GPU_SPECS = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
# HBM per chip by the device kind libtpu reports; compile-only devices carry no size.
TPU_CHIP_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95,
                    "TPU v6 lite": 32}
# Deviceless GPU compiles cannot autotune Triton GEMMs (there is no device to time them).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass
class Target:
  """What to compile for: devices and what one of them holds."""
  name: str                  # e.g. 'v5e:8x8', 'h100 1x8x8', 'cpu x8'
  platform: str              # 'tpu', 'gpu', 'cpu'
  devices: list
  device_kind: str
  memory_bytes: int | None   # per device; None: not known (fake CPU devices)
  compiler_options: dict = dataclasses.field(default_factory=dict)
  compiler: str = ""         # what compiled it, e.g. 'libtpu 0.0.42.1'


def use_host_cpu() -> None:
  """Keeps jax on the host CPU while the TPU/CUDA compilers are loaded as plugins.

  Must run before jax starts a backend. libtpu otherwise allows one process per
  machine (tests and the CLI may overlap).
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax.config.update("jax_platforms", "cpu")


def package_version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def tpu_compiler() -> str:
  """'libtpu 0.0.42.1': the libtpu jax loads, TPU_LIBRARY_PATH's where that is set.

  A libtpu other than the installed one is used by pointing TPU_LIBRARY_PATH at the
  libtpu.so of an unpacked wheel, whose dist-info folder names its version.
  """
  path = os.environ.get("TPU_LIBRARY_PATH")
  if not path:
    return f"libtpu {package_version('libtpu')}"
  wheel_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  infos = glob.glob(os.path.join(wheel_root, "libtpu-*.dist-info"))
  if len(infos) == 1:
    return "libtpu " + os.path.basename(infos[0])[len("libtpu-"):-len(".dist-info")]
  return f"libtpu at {path}"


def gpu_spec_text(gpu: str) -> str:
  if gpu not in GPU_SPECS:
    raise ValueError(f"--gpu {gpu!r}: expected one of {sorted(GPU_SPECS)}")
  with open(os.path.join(_SPECS_DIR, GPU_SPECS[gpu])) as f:
    return f.read()


def gpu_memory_bytes(spec_text: str) -> int:
  match = re.search(r"device_memory_size:\s*(\d+)", spec_text)
  if not match:
    raise ValueError("GpuTargetConfig text has no gpu_device_info.device_memory_size")
  return int(match.group(1))


def tpu_memory_bytes(devices: list) -> int:
  """HBM per jax device: the chip's HBM over the devices (TensorCores) it holds."""
  kind = devices[0].device_kind
  if kind not in TPU_CHIP_HBM_GIB:
    raise ValueError(f"unknown TPU device kind {kind!r}: add its HBM to TPU_CHIP_HBM_GIB")
  per_chip = 1 + max(int(getattr(d, "core_on_chip", 0)) for d in devices)
  return TPU_CHIP_HBM_GIB[kind] * GIB // per_chip


def tpu_target(topology: str, chip_config: str = "default", slices: int = 1) -> Target:
  """A TPU topology by libtpu's name ('v5e:2x4', 'v5p:4x4x4', 'v6e:16x16', 'v4:2x2x2').

  `slices` > 1: that many copies joined over the data-centre network (devices carry
  `slice_index`; give the mesh a `dcn` section). `chip_config`: libtpu's chip config
  ('default', or 'megacore' for v4/v5p's two cores as one device).
  """
  from jax.experimental import topologies
  kwargs = {"chip_config_name": chip_config}
  if slices > 1:
    kwargs["num_slices"] = slices
  devices = list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
  name = topology + (f" x{slices} slices" if slices > 1 else "")
  return Target(name, "tpu", devices, devices[0].device_kind, tpu_memory_bytes(devices),
                compiler=tpu_compiler())


def gpu_memory_fraction() -> float:
  """The share of GPU memory jax's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75
  by default): what a run can use, so what a step must fit in."""
  return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def gpu_target(gpu: str, topology: str) -> Target:
  """`topology` 'slices x hosts x GPUs per host', e.g. '1x8x8' for 64 GPUs on 8 hosts.

  The target's memory is the GPU's times `gpu_memory_fraction()`.
  """
  from jax.experimental import topologies
  spec = gpu_spec_text(gpu)
  devices = list(topologies.get_topology_desc(
      "", "cuda", target_config=spec, topology=topology).devices)
  return Target(f"{gpu} {topology}", "gpu", devices, devices[0].device_kind,
                int(gpu_memory_bytes(spec) * gpu_memory_fraction()),
                dict(GPU_COMPILER_OPTIONS),
                compiler=f"jax-cuda12-plugin {package_version('jax-cuda12-plugin')}")


def cpu_target(count: int | None = None) -> Target:
  """The host's (fake) CPU devices: all of them, or the first `count`."""
  devices = jax.devices("cpu")
  if count is not None:
    if count > len(devices):
      raise ValueError(f"{count} CPU devices asked for, {len(devices)} exist (set "
                       "jax_num_cpu_devices before jax starts)")
    devices = devices[:count]
  return Target(f"cpu x{len(devices)}", "cpu", devices, devices[0].device_kind, None,
                compiler=f"XLA:CPU (jaxlib {package_version('jaxlib')})")


def make_target(topology: str = "", gpu: str = "", devices: int | None = None,
                chip_config: str = "default", slices: int = 1) -> Target:
  """--gpu and --topology → a GPU target; --topology alone → TPU; else fake CPUs."""
  if gpu:
    return gpu_target(gpu, topology or "1x1x8")
  if topology:
    return tpu_target(topology, chip_config, slices)
  return cpu_target(devices)


def available(platform: str) -> str | None:
  """None if this interpreter can compile for `platform` ('tpu', 'gpu'), else why not."""
  try:
    if platform == "tpu":
      tpu_target("v5e:2x2")
    else:
      gpu_target("h100", "1x1x2")
  except Exception as e:  # pylint: disable=broad-except
    return f"{platform} compiler unavailable: {type(e).__name__}: {str(e)[:200]}"
  return None
