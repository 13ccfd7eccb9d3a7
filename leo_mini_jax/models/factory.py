"""The LEO-MINI model a run config describes, and its parameter tree without memory.

Training, evaluation, conversion, config validation and the benchmarks all size the
model from `abstract_params` (one `jax.eval_shape` of `init`), so they agree on every
parameter's path, shape, dtype and logical axis names.
"""

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from leo_mini_jax import batch as batch_lib
from leo_mini_jax.models import leo_mini as leo_mini_lib


def build_model(config: ml_collections.ConfigDict) -> leo_mini_lib.LeoMini:
  return leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(
      config.model, max_llm_length=batch_lib.llm_length_limit(config.data)))


def init_shapes(model: nn.Module, batch: dict[str, Any], boxed: bool = True) -> Any:
  """`model.init(key, batch)['params']` as ShapeDtypeStructs; `boxed` keeps the
  logical-axis boxes (`nn.Partitioned`) that the sharding rules read."""
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(config: ml_collections.ConfigDict, model: nn.Module | None = None,
                    boxed: bool = True) -> Any:
  """The config's parameter tree (ShapeDtypeStructs, no memory), from the batch contract's
  dummy batch; pass `model` when it is already built."""
  model = build_model(config) if model is None else model
  return init_shapes(model, batch_lib.dummy_batch(config), boxed)
