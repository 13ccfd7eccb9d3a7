"""The model factory: one abstract parameter tree for every entry point."""

import pytest
import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from configs import tiny
from leo_mini_jax import batch as batch_lib
from leo_mini_jax import config_validation
from leo_mini_jax.models import factory


def _shapes(tree):
  return {p: (x.shape, x.dtype) for p, x in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.mark.slow  # > 20 s on the 2-core CI machine
def test_abstract_params_match_a_real_init():
  config = tiny.get_config("stage=3")
  model = factory.build_model(config)
  real = nn.unbox(model.init(jax.random.key(1), batch_lib.dummy_batch(config))["params"])
  abstract = factory.abstract_params(config, boxed=False)
  assert _shapes(abstract) == _shapes(real)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


def test_boxed_tree_keeps_the_logical_axis_names():
  config = tiny.get_config("stage=2")
  boxed = factory.abstract_params(config)
  names = [x.names for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
      x, nn.Partitioned)) if isinstance(x, nn.Partitioned)]
  assert names and all(isinstance(n, tuple) for n in names)
  assert _shapes(nn.unbox(boxed)) == _shapes(factory.abstract_params(config, boxed=False))


def test_validation_reads_the_factory_paths():
  config = tiny.get_config("stage=2")
  paths = config_validation.parameter_paths(config)
  assert sorted(paths) == sorted(_shapes(factory.abstract_params(config, boxed=False)))


def test_init_shapes_of_any_batch():
  config = tiny.get_config("stage=1")
  model = factory.build_model(config)
  batch = batch_lib.dummy_batch(config, 2)
  batch["input_ids"] = np.zeros((2, 5), np.int32)
  assert _shapes(factory.init_shapes(model, batch, boxed=False)) == _shapes(
      factory.abstract_params(config, model, boxed=False))
