"""The batch contract: one module that the data pipeline and the model both read."""

import ast
import os

import jax
import numpy as np

from configs import tiny
from leo_mini_jax import batch as batch_lib
from leo_mini_jax.data import conversation
from leo_mini_jax.data import pipeline


def test_dummy_batch_has_the_contract_keys_and_shapes():
  config = tiny.get_config("stage=1")
  batch = batch_lib.dummy_batch(config, 3)
  assert tuple(batch) == batch_lib.BATCH_KEYS
  length, resolution = config.data.max_length, config.data.resolution
  assert batch["input_ids"].shape == (3, length) and batch["input_ids"].dtype == np.int32
  assert (batch["input_ids"] == batch_lib.IMAGE_PLACEHOLDER_ID).sum(1).tolist() == [1, 1, 1]
  assert batch["image"].shape == (3, resolution, resolution, 3)
  assert batch["image"].dtype == np.uint8 and batch["has_image"].dtype == bool


def test_abstract_batch_matches_the_dummy_batch_at_any_size():
  config = tiny.get_config("stage=1")
  abstract = batch_lib.abstract_batch(config, 8)
  real = batch_lib.dummy_batch(config, 8)
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in real.items()}
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in abstract.values())


def test_data_re_exports_the_contract():
  assert conversation.IMAGE_PLACEHOLDER_ID == batch_lib.IMAGE_PLACEHOLDER_ID == -200
  assert pipeline.BATCH_KEYS is batch_lib.BATCH_KEYS


def test_models_do_not_import_the_data_package():
  root = os.path.join(os.path.dirname(batch_lib.__file__), "models")
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        with open(path) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("leo_mini_jax.data"), (path, node.module)
