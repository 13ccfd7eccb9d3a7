"""benchmarks.scale: the train step compiled from abstract shapes on 4 fake devices."""

import jax
import pytest

from benchmarks import scale
from leo_mini_jax.parallel import mesh as mesh_lib
from tests.training.conftest import small_config


def test_per_device_bytes_fall_as_fsdp_grows():
  assert jax.device_count() == 4
  config = small_config(2)
  config.model.llm.num_layers = 1
  results = {}
  for fsdp in (1, 4):
    mesh = mesh_lib.make_mesh(dict(data=4 // fsdp, fsdp=fsdp, tensor=1))
    results[fsdp] = scale.measure(config, mesh, top=3)
  one, four = results[1], results[4]
  # Parameters and Adam moments split 4 ways (a few small or indivisible arrays stay
  # replicated), and so do the compiled step's resident arguments. (This model is so
  # small that its activations and FSDP's gather buffers outweigh the state: `temp`
  # is not compared.)
  assert four["params"] < 0.4 * one["params"], (one["params"], four["params"])
  assert four["optimizer"] < 0.4 * one["optimizer"]
  assert four["arguments"] < 0.5 * one["arguments"], (one["arguments"], four["arguments"])
  assert one["batch"] == four["batch"]  # the batch is split over data × fsdp both times
  assert "fsdp" in four["largest"][0]["spec"] and "fsdp" not in one["largest"][0]["spec"]


def test_mesh_flag_names_every_mesh_axis():
  assert scale.parse_mesh("fsdp=-1,tensor=2") == {
      axis: {"fsdp": -1, "tensor": 2}.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  with pytest.raises(ValueError, match="--mesh 'pipeline=2'"):
    scale.parse_mesh("pipeline=2")
