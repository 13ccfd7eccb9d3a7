"""Device mesh, logical-axis rules, batch sharding and multi-host set-up.

Parameters and activations name their axes logically ('embed', 'mlp', 'activation_batch',
...; every name is spelled once, in `parallel.axes`); a rules table maps logical names to
the mesh axes ('data', 'fsdp', 'tensor'). A name the table does not know is an error
naming it and where it is used, never a silent replication. Parameters and activations
read the same table by different procedures (`spec_for` says why and when they agree);
tests/parallel/golden/ records what the paper models get.
Shardings of the train state are derived from abstract shapes, never from materialised
arrays, and a mesh axis that does not divide a dimension is dropped for that array
(a 3-expert LoRA bank stays replicated on a 2-way 'tensor' axis instead of failing).
"""

import contextlib
import math
from typing import Any, Sequence

import flax.core.meta
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from leo_mini_jax.parallel import axes as ax
from leo_mini_jax.parallel.axes import BATCH_AXES, FSDP, MESH_AXES, TENSOR

# (logical name, mesh axes). Parameters: per dimension, the first rule of its name whose
# mesh axes are free and divide it wins; activations: flax's resolution (see `spec_for`).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    (ax.ACTIVATION_BATCH, BATCH_AXES),
    (ax.ACTIVATION_LENGTH, None),
    (ax.ACTIVATION_EMBED, None),
    (ax.ACTIVATION_HEADS, TENSOR),
    (ax.ACTIVATION_KV_HEADS, TENSOR),
    (ax.ACTIVATION_MLP, TENSOR),
    (ax.ACTIVATION_VOCAB, TENSOR),
    (ax.ACTIVATION_VISION_TOKENS, None),
    (ax.ACTIVATION_VISION_EMBED, None),
    # LLM parameters
    (ax.VOCAB, TENSOR),
    (ax.EMBED, FSDP),
    (ax.MLP, TENSOR),
    # Where 'embed' cannot take 'fsdp' (the MMoE LoRA banks [layers, experts, rank, mlp]),
    # 'mlp' does: otherwise those banks and their Adam moments stay whole on every device.
    (ax.MLP, FSDP),
    (ax.HEADS, TENSOR),
    (ax.KV_HEADS, TENSOR),
    (ax.NORM, None),
    (ax.LAYERS, None),
    # MMoE-LLM: low-rank and tiny, replicated apart from their 'embed'/'mlp' axis
    (ax.LORA_EXPERTS, None),
    (ax.LORA_RANK, None),
    (ax.ROUTER_HIDDEN, None),
    (ax.ROUTER_EXPERTS, None),
    (ax.ROUTER_CONTEXT, FSDP),
    # vision experts, reducer, projector
    (ax.VISION_EMBED, FSDP),
    (ax.VISION_MLP, TENSOR),
    (ax.VISION_HEADS, TENSOR),
    (ax.VISION_POS, None),
    (ax.CONV_HEIGHT, None),
    (ax.CONV_WIDTH, None),
    (ax.CONV_IN, None),
    (ax.CONV_OUT, TENSOR),
    (ax.COTR, None),
    (ax.QUERIES, None),
    (ax.PROJECTOR_IN, FSDP),
    (ax.PROJECTOR_HIDDEN, TENSOR),
)


def _mesh_axes_of(physical: Any) -> tuple:
  """A rule's right side (None, 'fsdp' or ('data', 'fsdp')) as a tuple of mesh axes."""
  if physical is None:
    return ()
  return (physical,) if isinstance(physical, str) else tuple(physical)


def check_rules(rules: Sequence[tuple[str, Any]]) -> None:
  """Every rule maps a known logical name (`parallel.axes`) to known mesh axes, and every
  known logical name has a rule (`(name, None)` when it is to be replicated).

  Raises ValueError naming the rule or the missing names: a misspelled name in a rules
  table would otherwise never match, and its arrays would silently be replicated.
  """
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"sharding rule {i} {rule!r}: expected (logical name, mesh axes)")
    logical, physical = rule
    if logical not in ax.LOGICAL_AXES:
      raise ValueError(f"sharding rule {i} {tuple(rule)!r}: unknown logical axis "
                       f"{logical!r}; known: {', '.join(ax.LOGICAL_AXES)}")
    unknown = [a for a in _mesh_axes_of(physical) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding rule {i} {tuple(rule)!r}: unknown mesh axes {unknown}; "
                       f"expected some of {MESH_AXES}")
  missing = [name for name in ax.LOGICAL_AXES if name not in {r[0] for r in rules}]
  if missing:
    raise ValueError(f"sharding rules: no rule for logical axes {missing}; give each a rule "
                     "(mesh axes None to replicate)")


def _axis_sizes(shape: Any, where: str) -> list[int]:
  """{'data': 2, ...} or a sequence → sizes in MESH_AXES order (missing axes are 1)."""
  if isinstance(shape, dict) or hasattr(shape, "keys"):
    unknown = sorted(set(shape.keys()) - set(MESH_AXES) - {"dcn", "process_is_granule"})
    if unknown:
      raise ValueError(f"{where}: unknown axes {unknown}; expected {MESH_AXES}")
    return [int(shape.get(axis, 1)) for axis in MESH_AXES]
  return [int(s) for s in shape]


def _fill_rest(sizes: list[int], total: int, where: str) -> list[int]:
  """Replaces one -1 by what is left of `total`; checks the product."""
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"{where}: at most one axis may be -1, got {named}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or total % known:
      raise ValueError(f"{where}: {total} devices do not split into {named}")
    sizes = list(sizes)
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"{where} {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, have {total}")
  return sizes


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None, dcn: Any = None,
              process_is_granule: bool = False) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor') that follows the physical topology.

  Args:
    shape: sizes per axis within one slice (ICI); one may be -1 ("the rest"). A dict
      may carry the `dcn` section itself (`config.mesh`).
    devices: defaults to all devices (`jax.devices()`); tests pass a subset.
    dcn: slices per axis across the data-centre network, e.g. {'data': 2} for two
      v5e-256 slices; the mesh axis is ICI size × DCN size. None or all ones: one slice.
    process_is_granule: treat each process as a "slice" (GPU hosts, CPU tests), for
      platforms whose devices carry no `slice_index`.

  `jax.make_mesh` / `mesh_utils.create_hybrid_device_mesh` order the devices so that
  neighbours on an axis are neighbours on the interconnect (a plain reshape of
  `jax.devices()` is not, on TPU pods).
  """
  if dcn is None and hasattr(shape, "get"):
    dcn = shape.get("dcn")
    process_is_granule = bool(shape.get("process_is_granule", process_is_granule))
  devices = list(jax.devices() if devices is None else np.asarray(devices).ravel())
  dcn_sizes = _axis_sizes(dcn or {}, "mesh.dcn")
  if any(s < 1 for s in dcn_sizes):
    raise ValueError(f"mesh.dcn: sizes must be >= 1, got {dict(zip(MESH_AXES, dcn_sizes))}")
  num_slices = math.prod(dcn_sizes)
  if len(devices) % num_slices:
    raise ValueError(f"mesh.dcn {dict(zip(MESH_AXES, dcn_sizes))}: {len(devices)} devices "
                     f"do not split into {num_slices} slices")
  ici_sizes = _fill_rest(_axis_sizes(shape, "mesh"), len(devices) // num_slices, "mesh")
  if num_slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici_sizes, dcn_sizes, devices, process_is_granule=process_is_granule)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  try:
    # Auto axes: shardings come from the rules tables, as with a plain `Mesh`.
    return jax.make_mesh(tuple(ici_sizes), MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES))
  except (ValueError, NotImplementedError, AssertionError):
    # A device subset that is not a whole physical sub-slice (tests on part of a host).
    return Mesh(np.asarray(devices).reshape(ici_sizes), MESH_AXES)


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Any,
             rules: Sequence[tuple[str, Any]], where: str = "array") -> P:
  """PartitionSpec for one parameter (or other stored array) from its logical axis names.

  Dimension by dimension, left to right: the first rule of the dimension's name whose
  mesh axes (those of size > 1) are not yet used by an earlier dimension and divide its
  size; no such rule leaves the dimension whole. A name with no rule at all is an error
  naming it and `where` (the parameter's path). `mesh` needs only `.shape` (a `Mesh` or
  an `AbstractMesh`).

  Activations resolve the same table differently: models constrain them with flax's
  `nn.with_logical_constraint`, which walks the rules in table order (a rule takes its
  dimension if its mesh axes are still free), keeps size-1 mesh axes and checks no
  divisibility. Parameters need this procedure instead: their shapes are whatever the
  model needs (3 LoRA experts, a 7-row position table), every stored array must split
  evenly, and a dimension whose first choice is unavailable (a size-1 or taken axis,
  a size it does not divide) falls back to its next rule ('mlp': 'tensor', else 'fsdp')
  or stays whole, so a parameter still gets split somewhere. Activations have one rule
  per name and sizes checked at start (the batch divides over 'data' x 'fsdp':
  `training.loop.check_batch`), so where every axis divides both procedures give the
  same spec; tests/parallel/test_sharding_golden.py checks that, and that every name
  is known, for every activation of both paper models (flax itself replicates an
  unknown activation name silently).
  """
  if names is None:
    return P()
  table: dict[str, list] = {}
  for logical, physical in rules:
    table.setdefault(logical, []).append(physical)
  unknown = [name for name in names if name is not None and name not in table]
  if unknown:
    raise ValueError(f"{where}: logical axis {unknown[0]!r} (of {tuple(names)}) has no "
                     "sharding rule; known names are in leo_mini_jax/parallel/axes.py, "
                     "rules in mesh.DEFAULT_RULES / config.sharding_rules")
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, names):
    chosen = None
    for physical in table[name] if name is not None else []:
      axes = tuple(a for a in _mesh_axes_of(physical) if mesh.shape.get(a, 1) > 1)
      size = math.prod(mesh.shape[a] for a in axes)
      if axes and not used.intersection(axes) and dim % size == 0:
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(chosen)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _key_path(path) -> str:
  """A pytree key path as 'params/llm/layers/q_proj/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _current_module_path() -> str:
  """'llm/layers/attention/q' inside a flax module's method, else 'array'."""
  module = nn.module._context.module_stack[-1]  # pylint: disable=protected-access
  return "/".join(module.path) if module is not None and module.path else "array"


def gathered(weight: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`weight` (logical axis `names`) constrained to its sharding minus the FSDP axis.

  FSDP stores each weight split over 'fsdp' and must all-gather it where it is used
  (per layer, inside the layer scan). Left to itself, XLA's sharding propagation may
  instead keep the weight split on its contracting dimension and all-gather the
  *activations* over the batch, then all-reduce the product: every device then computes
  the whole global batch (seen at paper scale: the frozen LLM of stage 3 held
  [layers, global batch, length, embed] on every device). Constraining the weight at
  its use makes the all-gather explicit; its transpose is the gradient's reduce-scatter.
  A no-op outside a mesh context (single-device apply, tests without a mesh).
  """
  mesh = flax.core.meta.get_global_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh is None or not rules or mesh.shape.get(FSDP, 1) == 1:
    return weight
  spec = spec_for(weight.shape, names, mesh, rules, where=_current_module_path())
  def drop(entry):
    if entry is None or isinstance(entry, str):
      return None if entry == FSDP else entry
    kept = tuple(a for a in entry if a != FSDP)
    return kept[0] if len(kept) == 1 else (kept or None)
  return jax.lax.with_sharding_constraint(weight, NamedSharding(mesh, P(*map(drop, spec))))


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a (boxed) abstract tree from `jax.eval_shape(model.init, ...)`.

  Leaves carrying `nn.LogicallyPartitioned` metadata are sharded by their names; plain
  leaves (optimizer counts, RNG keys) are replicated. The result has the unboxed tree's
  structure. A logical name without a rule is an error naming the leaf's path.
  """
  check_rules(rules)
  def one(path, leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      if not hasattr(value, "shape"):  # e.g. optax.MaskedNode: an empty subtree
        return value
      return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules,
                                          where=_key_path(path)))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(
      one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Context manager that lets `nn.with_logical_constraint` resolve activation names."""
  return nn.logical_axis_rules(tuple(rules))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """The mesh and rules every traced model call runs under.

  `jax.set_mesh`, not `with mesh:`: flax's `with_logical_constraint` reads JAX's
  abstract mesh, which `with mesh:` does not set, and without it every activation
  constraint is silently dropped; XLA then propagates the weights' FSDP sharding into
  the activations and each device computes the whole global batch.
  """
  check_rules(rules)
  try:
    mesh_context = jax.set_mesh(mesh)
  except ValueError:  # inside a trace (e.g. make_jaxpr of a step that activates itself)
    mesh_context = jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
  with mesh_context, nn.logical_axis_rules(tuple(rules)):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch → global jax.Arrays; global batch = local × processes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def default_distributed_config() -> dict:
  """The `distributed` config section. Optional fields are typed placeholders (None by
  default, settable from the command line: --config.distributed.process_id=3)."""
  placeholder = ml_collections.config_dict.placeholder
  return dict(
      # True: call jax.distributed.initialize. With no other field set, JAX reads the
      # coordinator, process count and id from the platform (TPU pods, SLURM, Open MPI).
      multi_host=False,
      coordinator_address=placeholder(str),  # 'host:port' of process 0
      num_processes=placeholder(int),
      process_id=placeholder(int),
      local_device_ids=placeholder(str),  # '0,1': the GPUs this process drives
      initialization_timeout=300,  # seconds to wait for every process to join
  )


def initialize_distributed(config: Any) -> bool:
  """`jax.distributed.initialize` when `config` (the `distributed` section) asks for it.

  Multi-host when `multi_host` is set or a coordinator address is given; explicit fields
  are passed on, the rest JAX detects from the platform. Call before any other JAX call.
  Afterwards JAX's preemption service owns SIGTERM (see `training.preemption`).
  Returns whether this run is multi-process.
  """
  if not (config.get("multi_host", False) or config.get("coordinator_address")):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {k: config[k] for k in ("coordinator_address", "num_processes", "process_id")
            if config.get(k) is not None}
  if config.get("local_device_ids"):
    kwargs["local_device_ids"] = [int(i) for i in str(config.local_device_ids).split(",")]
  if config.get("initialization_timeout"):
    kwargs["initialization_timeout"] = int(config.initialization_timeout)
  jax.distributed.initialize(**kwargs)
  return True


def setup_runtime(config: Any) -> None:
  """Process start-up for train.py / eval.py: multi-host init, then the compilation cache.

  `config.compilation_cache_dir` ('' = off; local or gs://) keeps compiled programs
  across restarts, so a preempted pod job does not recompile its train step.
  """
  initialize_distributed(config.get("distributed") or {})
  cache_dir = config.get("compilation_cache_dir")
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def process_summary(mesh: Mesh) -> str:
  """One line for the start of a run's log: processes, devices, mesh."""
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} "
          f"{jax.devices()[0].platform} devices; mesh {dict(mesh.shape)}")


def data_parallel_size(mesh: Mesh) -> int:
  """Devices the batch is split over (mesh 'data' × 'fsdp')."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
