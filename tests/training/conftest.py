"""Small configs and meshes shared by the training tests."""

import jax
import pytest

from configs import tiny
from leo_mini_jax.parallel import mesh as mesh_lib


def small_config(stage: int, experts: tuple[str, ...] = ("clip",), **overrides):
  """The tiny config at batch 8, 4 steps, with `experts` only: CLIP alone by default,
  since ConvNeXt triples a train step's compile time and most tests are about the run,
  not the expert set (those that are pass experts=("clip", "convnext"))."""
  config = tiny.get_config(f"stage={stage},steps=4")
  config.model.experts = [e for e in config.model.experts if e["name"] in experts]
  config.data.batch_size = 8
  config.data.num_train = 64
  config.data.num_eval = 16
  config.data.read_threads = 1
  config.optimizer.warmup_steps = 1
  config.log_every = 1
  config.eval.batch_size = 8
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.fixture
def one_device_mesh():
  return mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
