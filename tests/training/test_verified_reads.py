"""init_from and eval read checkpoints with resume's verification and fall back."""

import numpy as np
import pytest

import jax
import ml_collections

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import recovery
from leo_mini_jax.training import step as step_lib
from tests.training.test_bad_checkpoints import flip_one_byte, truncate


def _workdir_with_two_steps(tmp_path):
  """Steps 1 and 2 of a small state, saved as the loop saves them (with checksums)."""
  cfg = ml_collections.ConfigDict({"keep": 5, "keep_period": None, "async_save": False})
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), cfg)
  params = {}
  try:
    for step in (1, 2):
      kernel = np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32)
      params[step] = {"proj": {"kernel": kernel}}
      state = step_lib.TrainState(np.int32(step), params[step],
                                  {"mu": np.zeros((3,), np.float32)})
      checkpointer.save(step, state, {"examples_seen": 8 * step, "stage": 2,
                                      "checksums": recovery.state_checksums(state)})
  finally:
    checkpointer.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params[1])
  return abstract, params


@pytest.mark.parametrize("corrupt", [flip_one_byte, truncate])
def test_a_broken_latest_step_is_named_and_the_previous_one_read(tmp_path, corrupt, caplog):
  abstract, params = _workdir_with_two_steps(tmp_path)
  corrupt(str(tmp_path / "checkpoints" / "2"))
  source = {}
  loaded, _ = checkpoints_lib.load_params(str(tmp_path), abstract, source=source)
  np.testing.assert_array_equal(np.asarray(loaded["proj"]["kernel"]),
                                params[1]["proj"]["kernel"])
  assert source["step"] == 1
  assert f"checkpoints/2/state is broken" in caplog.text
  assert "the latest complete checkpoint" in caplog.text


def test_no_complete_step_stops_naming_each(tmp_path):
  abstract, _ = _workdir_with_two_steps(tmp_path)
  for step in (1, 2):
    flip_one_byte(str(tmp_path / "checkpoints" / str(step)))
  with pytest.raises(checkpoints_lib.BrokenCheckpointError,
                     match=r"no complete checkpoint.*2/state: ValueError: checksum mismatch"
                           r".*1/state: ValueError: checksum mismatch"):
    checkpoints_lib.load_params(str(tmp_path), abstract)


def test_init_from_a_stage_1_run_into_stage_3_warns(tmp_path, caplog):
  abstract, _ = _workdir_with_two_steps(tmp_path)  # saved as stage 2
  source = {}
  checkpoints_lib.load_params(str(tmp_path), abstract, source=source)
  assert source["record"]["stage"] == 2
  assert not recovery.warn_skipped_stage(source, 3)
  source["record"]["stage"] = 1
  assert recovery.warn_skipped_stage(source, 3)
  assert "stage-1 checkpoint, initialising stage 3: stage 2 is skipped" in caplog.text
