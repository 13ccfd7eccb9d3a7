"""Device mesh, logical-axis rules, batch sharding and multi-host set-up.

Parameters and activations name their axes logically ('embed', 'mlp', 'activation_batch',
...); a rules table maps logical names to the mesh axes ('data', 'fsdp', 'tensor').
Shardings of the train state are derived from abstract shapes, never from materialised
arrays, and a mesh axis that does not divide a dimension is dropped for that array
(a 3-expert LoRA bank stays replicated on a 2-way 'tensor' axis instead of failing).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). The first rule whose mesh axes are free and divide the
# dimension wins (flax.linen.logical_to_mesh_axes semantics plus the divisibility check).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_vision_tokens", None),
    ("activation_vision_embed", None),
    # LLM parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
    # MMoE-LLM: low-rank and tiny, replicated apart from their 'embed'/'mlp' axis
    ("lora_experts", None),
    ("lora_rank", None),
    ("router_hidden", None),
    ("router_experts", None),
    ("router_context", "fsdp"),
    # vision experts, reducer, projector
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_pos", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("cotr", None),
    ("queries", None),
    ("projector_in", "fsdp"),
    ("projector_hidden", "tensor"),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor'); one size may be -1 ("the rest")."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if isinstance(shape, dict) or hasattr(shape, "keys"):
    unknown = sorted(set(shape.keys()) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"mesh: unknown axes {unknown}; expected {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f"mesh: {devices.size} devices do not split into "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {devices.size}")
  return Mesh(devices.reshape(sizes), MESH_AXES)


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> P:
  """PartitionSpec for one array from its logical axis names."""
  if names is None:
    return P()
  table: dict[str, list] = {}
  for logical, physical in rules:
    table.setdefault(logical, []).append(physical)
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, names):
    chosen = None
    for physical in table.get(name, [None]) if name is not None else [None]:
      axes = () if physical is None else (
          (physical,) if isinstance(physical, str) else tuple(physical))
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
      size = math.prod(mesh.shape[a] for a in axes)
      if axes and not used.intersection(axes) and dim % size == 0:
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(chosen)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a (boxed) abstract tree from `jax.eval_shape(model.init, ...)`.

  Leaves carrying `nn.LogicallyPartitioned` metadata are sharded by their names; plain
  leaves (optimizer counts, RNG keys) are replicated. The result has the unboxed tree's
  structure.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      if not hasattr(value, "shape"):  # e.g. optax.MaskedNode: an empty subtree
        return value
      return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Context manager that lets `nn.with_logical_constraint` resolve activation names."""
  return nn.logical_axis_rules(tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch → global jax.Arrays; global batch = local × processes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def initialize_distributed(config: Any) -> None:
  """`jax.distributed.initialize` when the config asks for multi-host."""
  if not config.get("multi_host", False):
    return
  kwargs = {k: config[k] for k in ("coordinator_address", "num_processes", "process_id")
            if config.get(k) is not None}
  jax.distributed.initialize(**kwargs)
