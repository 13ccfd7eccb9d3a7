"""Non-finite steps: not applied, counted, and too many in a row stop the run unsaved."""

import json
import os

import jax
import numpy as np
import pytest

from leo_mini_jax import tree_checks
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import guards as guards_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import metrics as metrics_lib
from tests.training.conftest import small_config


def poison(batch, vocab_size):
  """An id past the vocabulary on a supervised token: its embedding (jnp.take's fill
  mode) and hence the loss are NaN, as with a tokenizer larger than the model."""
  batch = {k: np.array(v) for k, v in batch.items()}
  row, col = np.argwhere(batch["loss_mask"] > 0)[0]
  batch["input_ids"][row, col] = vocab_size
  return batch


def _equal_trees(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_nan_step_leaves_params_and_optimizer_state_unchanged(one_device_mesh):
  config = small_config(3)
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  train_step = setup.jit_train_step()
  batch = next(pipeline_lib.make_dataset(config.data, split="train").iterator())
  before = jax.device_get(state)  # the step donates its input state

  state, metrics = train_step(state, setup.global_batch(poison(batch,
                                                              config.model.llm.vocab_size)))
  assert float(metrics["nonfinite"]) == 1.0
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == 1  # the step (and the data stream) moves on
  _equal_trees(after.params, before.params)
  _equal_trees(after.opt_state, before.opt_state)

  # The same state then trains normally on a clean batch.
  state, metrics = train_step(state, setup.global_batch(batch))
  assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  changed = jax.device_get(state)
  assert tree_checks.tree_is_finite(changed.params)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(changed.params), jax.tree.leaves(before.params)))


@pytest.mark.slow  # > 20 s on the 2-core CI machine
def test_a_non_finite_update_from_finite_gradients_is_not_applied(one_device_mesh):
  # An infinite learning rate: loss and gradient norm are finite, the update is not.
  config = small_config(2, **{"optimizer.lr": float("inf")})
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  train_step = setup.jit_train_step()
  batch = setup.global_batch(next(pipeline_lib.make_dataset(config.data).iterator()))
  before = jax.device_get(state)
  state, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["nonfinite"]) == 1.0 and float(metrics["nonfinite_update"]) == 1.0
  after = jax.device_get(state)
  _equal_trees(after.params, before.params)
  _equal_trees(after.opt_state, before.opt_state)

  tracker = guards_lib.NonFiniteTracker(1)
  row = metrics_lib.scalar_metrics(jax.device_get(metrics))
  with pytest.raises(guards_lib.NonFiniteError,
                     match=r"step 1: .*update \(new parameters.*no update since the "
                           r"start of this run was applied"):
    tracker.observe([row], 1)


def test_bad_steps_are_counted_and_too_many_in_a_row_stop_the_run(
    tmp_path, one_device_mesh, monkeypatch):
  bad_steps = {2, 4, 5}
  config = small_config(3, total_steps=6, **{"train.max_bad_steps": 2,
                                             "checkpoint.every_steps": 1,
                                             "checkpoint.keep": 10})
  real_make_dataset = pipeline_lib.make_dataset

  def make_dataset(data_cfg, *args, start_position=0, **kwargs):
    data = real_make_dataset(data_cfg, *args, start_position=start_position, **kwargs)
    first_step = start_position // data_cfg.batch_size + 1
    iterator = data.iterator

    def poisoned():
      for step, batch in enumerate(iterator(), first_step):
        yield poison(batch, config.model.llm.vocab_size) if step in bad_steps else batch
    data.iterator = poisoned
    return data

  monkeypatch.setattr(loop.pipeline_lib, "make_dataset", make_dataset)
  workdir = str(tmp_path / "run")
  with pytest.raises(guards_lib.NonFiniteError, match=r"step 5: 2 non-finite steps in a "
                     r"row \(config.train.max_bad_steps=2;.*since step 3"):
    loop.train(config, workdir, progress=False, mesh=one_device_mesh)

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = {row["step"]: row for row in map(json.loads, f)}
  assert [rows[s]["nonfinite"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]
  assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 2.0]
  assert 5 not in rows

  # Checkpoints stop before the step that ended the run; a skipped step saved the
  # state of the step before it (with the data position moved past the bad batch).
  setup = loop.TrainSetup(config, one_device_mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    assert checkpointer.all_steps()[-1] == 4
    saved = {s: jax.device_get(checkpointer.restore(s, setup.abstract_state))
             for s in (1, 2, 3, 4)}
    assert checkpointer.data_position(2)["examples_seen"] == 2 * config.data.batch_size
  finally:
    checkpointer.close()
  for before, after in ((1, 2), (3, 4)):
    _equal_trees(saved[after].params, saved[before].params)
    _equal_trees(saved[after].opt_state, saved[before].opt_state)
  assert all(tree_checks.tree_is_finite(s.params) for s in saved.values())


def test_a_non_finite_state_is_never_saved(one_device_mesh):
  setup = loop.TrainSetup(small_config(2), one_device_mesh)
  state = setup.init_state(0)
  guards_lib.check_finite_state(state, 3)
  params = jax.tree.map(lambda x: x, state.params)
  params["projector"]["fc1"]["kernel"] = params["projector"]["fc1"]["kernel"].at[0, 0].set(
      np.inf)
  with pytest.raises(guards_lib.NonFiniteError, match="step 3"):
    guards_lib.check_finite_state(state.replace(params=params), 3)


def test_max_bad_steps_must_be_positive():
  with pytest.raises(ValueError, match="config.train.max_bad_steps"):
    guards_lib.NonFiniteTracker(0)
