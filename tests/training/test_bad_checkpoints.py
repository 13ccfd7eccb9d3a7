"""A broken checkpoint is never used silently; init_from names what is wrong."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import recovery
from tests.training.conftest import small_config


def _data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
  return sorted(files, key=os.path.getsize, reverse=True)


def truncate(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def garble(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def flip_one_byte(step_dir):
  """Orbax reads this without error (uncompressed chunk): only the checksums see it."""
  path = _data_files(step_dir)[0]
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def drop_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def _resume(config, workdir, mesh):
  setup = loop.TrainSetup(config, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    return loop.initial_state(setup, checkpointer) + (checkpointer.all_steps(),)
  finally:
    checkpointer.close()


@pytest.mark.parametrize("corrupt", [truncate, garble, flip_one_byte, drop_state])
def test_broken_latest_falls_back_to_the_previous_checkpoint(stage3_run, tmp_path, corrupt,
                                                              caplog):
  config, workdir, _, mesh = stage3_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  broken = os.path.join(copy, "checkpoints", "4")
  corrupt(broken)
  with caplog.at_level(logging.ERROR):
    state, how, steps = _resume(config, copy, mesh)
  assert how == "resumed from step 3"
  assert int(state.step) == 3 and steps == [1, 2, 3]
  assert any(broken in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)
  assert glob.glob(broken + ".broken-*")  # kept for inspection, out of the way

  # Training on resumes from step 3 and, data order and all, reaches the same step 4.
  summary = loop.train(config, copy, progress=False, mesh=mesh) if corrupt is truncate \
      else None
  if summary is not None:
    for a, b in zip(jax.tree.leaves(jax.device_get(summary["state"].params)),
                    jax.tree.leaves(stage3_run.state.params)):
      np.testing.assert_array_equal(a, b)
    assert recovery.read_metrics(copy).keys() == {1, 2, 3, 4}


def test_no_complete_checkpoint_stops_naming_the_directory(stage3_run, tmp_path):
  config, workdir, _, mesh = stage3_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  for step in (1, 2, 3, 4):
    truncate(os.path.join(copy, "checkpoints", str(step)))
  directory = os.path.join(copy, "checkpoints")
  with pytest.raises(checkpoints_lib.BrokenCheckpointError,
                     match=f"no complete checkpoint in {directory}.*step 4.*step 1"):
    _resume(config, copy, mesh)
  assert sorted(os.listdir(directory)) == ["1", "2", "3", "4"]  # nothing renamed


def test_a_checkpoint_of_another_step_or_tree_is_rejected(stage3_run):
  config, workdir, final, mesh = stage3_run
  setup = loop.TrainSetup(config, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    state = checkpointer.restore(3, setup.abstract_state)
    with pytest.raises(ValueError, match="step counter is 3, not 2"):
      recovery.check_restored(state, setup.abstract_state, 2, None)
    other = loop.TrainSetup(small_config(2), mesh).abstract_state
    with pytest.raises(ValueError, match="restored tree does not match"):
      recovery.check_restored(state, other, 3, None)
  finally:
    checkpointer.close()


def test_init_from_without_a_checkpoint_names_the_path(tmp_path, one_device_mesh):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"config.init_from: {empty} holds no checkpoint"):
    recovery.check_init_from(str(empty))
  (tmp_path / "workdir" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="checkpoints holds no finished checkpoint"):
    recovery.check_init_from(str(tmp_path / "workdir"))

  config = small_config(3, init_from=str(empty))
  setup = loop.TrainSetup(config, one_device_mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "new"), config.checkpoint)
  try:
    with pytest.raises(FileNotFoundError, match=str(empty)):
      loop.initial_state(setup, checkpointer)
  finally:
    checkpointer.close()


def test_init_from_the_wrong_model_names_the_path_and_first_keys(tmp_path, one_device_mesh):
  other = small_config(2, **{"model.llm.hidden_size": 64, "model.llm.num_layers": 1})
  # Only the tree and shapes matter here: zeros of the abstract params, no init compiled.
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        loop.TrainSetup(other, one_device_mesh).abstract_state.params)
  checkpoints_lib.save_params(str(tmp_path / "other"), params)
  config = small_config(2, init_from=str(tmp_path / "other"))
  setup = loop.TrainSetup(config, one_device_mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "new"), config.checkpoint)
  try:
    with pytest.raises(ValueError) as error:
      loop.initial_state(setup, checkpointer)
  finally:
    checkpointer.close()
  message = str(error.value)
  assert str(tmp_path / "other") in message
  assert "shape mismatch" in message and "llm/embed_tokens/embedding" in message
