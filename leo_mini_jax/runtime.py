"""The model at run time: what evaluation, `ask`, conversion and training share.

A `ModelRuntime` holds the model a config describes, its device mesh and sharding rules,
its abstract parameters with their shardings, and builds or initialises parameters
straight in those shardings. Training adds the optimizer, its state's shardings and the
jitted step on top (`training.loop.TrainSetup`); nothing here knows about them.

Shardings come from abstract shapes (`factory.abstract_params`), never from
materialised arrays, so the same code sizes an 8B model before allocating anything.
"""

from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from leo_mini_jax import batch as batch_lib
from leo_mini_jax import config_validation
from leo_mini_jax.models import factory
from leo_mini_jax.parallel import mesh as mesh_lib

# Programs that run once (initialisers, optimizer-state init) compile on CPU without LLVM
# optimisation: XLA:CPU spends most of their compile time optimising code that then runs
# for milliseconds (tiny stage-1 init: 38 → 13 s compile, run 41 → 147 ms, loaded machine).
# The train step keeps the default: at level 0 it runs ~40% slower.
ONE_SHOT_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def one_shot_jit(fn, **kwargs):
  """`jax.jit` for a function called once per run (see ONE_SHOT_CPU_OPTIONS)."""
  options = ONE_SHOT_CPU_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options, **kwargs)


def sharding_rules(config) -> tuple:
  rules = config.get("sharding_rules")
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules) if rules else (
      mesh_lib.DEFAULT_RULES)


class ModelRuntime:
  """The config's model on a mesh: parameter shapes, shardings and initialisation.

  Building one checks `config.schedule` against the model's parameter paths (train and
  eval both trace the model once, here).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.mesh = mesh or mesh_lib.make_mesh(dict(config.mesh))
    self.rules = sharding_rules(config)
    self.model = factory.build_model(config)
    # Boxed: each leaf keeps its logical axis names, which the rules map to mesh axes.
    self.abstract_boxed_params = factory.abstract_params(config, self.model)
    config_validation.check_schedule(
        config.schedule,
        list(traverse_util.flatten_dict(nn.unbox(self.abstract_boxed_params), sep="/")))
    self.param_shardings = mesh_lib.logical_shardings(self.abstract_boxed_params,
                                                      self.mesh, self.rules)
    self.abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(self.abstract_boxed_params), self.param_shardings)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, P())

  def init_params(self, seed: int) -> Any:
    """The model's initial parameters at `seed`, each in its sharding."""
    batch = batch_lib.dummy_batch(self.config)
    with mesh_lib.activate(self.mesh, self.rules):
      init = one_shot_jit(lambda rng: nn.unbox(self.model.init(rng, batch)["params"]),
                          out_shardings=self.param_shardings)
      return init(jax.random.PRNGKey(seed))

  def init_params_subset(self, paths: list[str], seed: int) -> dict[str, jax.Array]:
    """{path: freshly initialised value} for `paths` only, each in its target sharding.

    The values equal those of a full `init_params(seed)`; XLA drops the initialisers of
    every other parameter, so no full random copy of the model is ever allocated.
    """
    shardings = traverse_util.flatten_dict(self.param_shardings, sep="/")
    batch = batch_lib.dummy_batch(self.config)

    def init(rng):
      params = nn.unbox(self.model.init(rng, batch)["params"])
      flat = traverse_util.flatten_dict(params, sep="/")
      return {p: flat[p] for p in paths}

    with mesh_lib.activate(self.mesh, self.rules):
      return one_shot_jit(init, out_shardings={p: shardings[p] for p in paths})(
          jax.random.PRNGKey(seed))

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and sharding (to compile ahead of data)."""
    return batch_lib.abstract_batch(self.config, int(self.config.data.batch_size),
                                    self.batch_sharding)

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    local = {k: local_batch[k] for k in batch_lib.batch_keys(local_batch)}
    return mesh_lib.make_global_batch(local, self.mesh)
