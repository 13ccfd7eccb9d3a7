"""Table 6 as regex rules: trainable sets, optimizer state, frozen parameters after a step."""

import re

import jax
import numpy as np
import pytest

from leo_mini_jax.training import loop
from leo_mini_jax.training import optimizer as optimizer_lib
from tests.training.conftest import small_config


def _component(path: str) -> str:
  if re.search(r"/mmoe_", path):
    return "mmoe"
  return path.split("/")[0]  # llm, vision, projector, reducer


def _trainable_components(setup):
  flat = jax.tree_util.tree_flatten_with_path(setup.trainable)[0]
  by_component: dict[str, set] = {}
  for path, trainable in flat:
    by_component.setdefault(_component(optimizer_lib.path_str(path)), set()).add(bool(trainable))
  return by_component


@pytest.mark.parametrize("stage,expected", [
    (1, {"llm": {False}, "vision": {False}, "projector": {True}}),
    (2, {"llm": {True}, "vision": {True}, "projector": {True}}),
    (3, {"llm": {False}, "vision": {False}, "projector": {True}, "reducer": {True},
         "mmoe": {True}}),
])
def test_trainable_sets_are_table6(stage, expected, one_device_mesh):
  setup = loop.TrainSetup(small_config(stage), one_device_mesh)
  assert _trainable_components(setup) == expected


def test_stage3_optimizer_state_holds_no_frozen_leaf(one_device_mesh):
  setup = loop.TrainSetup(small_config(3), one_device_mesh)
  params = setup.abstract_state.params
  trainable = optimizer_lib.split_trainable(params, setup.trainable)[0]
  trainable_sizes = sorted(x.size for x in jax.tree.leaves(trainable))
  opt_leaves = [x for x in jax.tree.leaves(setup.abstract_state.opt_state) if x.ndim > 0]
  # Adam keeps exactly two moments per trainable leaf and nothing for frozen ones.
  assert sorted(x.size for x in opt_leaves) == sorted(trainable_sizes * 2)
  total = sum(x.size for x in jax.tree.leaves(params))
  assert sum(trainable_sizes) < total / 2


def test_frozen_parameters_are_bit_identical_after_a_step(one_device_mesh):
  config = small_config(3)
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  before = jax.device_get(state.params)
  batch = setup.global_batch(loop.dummy_batch(config, config.data.batch_size) | {
      "loss_mask": np.tile((np.arange(config.data.max_length) >= 2).astype(np.int32),
                           (config.data.batch_size, 1))})
  state, metrics = setup.jit_train_step()(state, batch)
  after = jax.device_get(state.params)
  assert float(metrics["grad_norm"]) > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  for (path, moved), (_, trainable) in zip(
      jax.tree_util.tree_flatten_with_path(changed)[0],
      jax.tree_util.tree_flatten_with_path(setup.trainable)[0]):
    if not trainable:
      assert not moved, optimizer_lib.path_str(path)
  assert any(jax.tree.leaves(changed))


def test_schedule_without_catch_all_names_the_parameter(one_device_mesh):
  config = small_config(1)
  config.schedule = [["projector/.*", "main"]]
  with pytest.raises(ValueError, match="matches no rule"):
    loop.TrainSetup(config, one_device_mesh)


def test_lr_multiplier_for_unknown_group_is_an_error(one_device_mesh):
  config = small_config(1)
  config.optimizer.lr_mults = {"vision": 0.1}
  with pytest.raises(ValueError, match="optimizer.lr_mults"):
    loop.TrainSetup(config, one_device_mesh)


def test_weight_decay_mask_skips_norms_biases_queries_and_positions():
  params = {"llm": {"final_norm": {"scale": 0}, "lm_head": {"kernel": 0}},
            "reducer": {"cotr": {"clip_queries": 0, "text_proj": {"bias": 0}}},
            "vision": {"clip": {"embeddings": {"position_embedding": 0}}}}
  mask = optimizer_lib.decay_mask(params, optimizer_lib.DEFAULT_NO_DECAY)
  assert mask == {"llm": {"final_norm": {"scale": False}, "lm_head": {"kernel": True}},
                  "reducer": {"cotr": {"clip_queries": False, "text_proj": {"bias": False}}},
                  "vision": {"clip": {"embeddings": {"position_embedding": False}}}}


def _first_updates(config, params):
  tx, _ = optimizer_lib.make_optimizer(config, params)
  grads = jax.tree.map(np.ones_like, params)
  updates, state = tx.update(grads, tx.init(params), params)
  return updates, state


def test_projector_lr_mult_scales_its_first_update_only():
  """Stage 3 of the paper configs: the projector trains at 0.1 × lr (LLaVA-1.5's LoRA
  recipe, mm_projector_lr 2e-5 beside 2e-4); CoTR and MMoE at lr; frozen leaves get
  neither updates nor optimizer state. Adam's first update is lr × sign(grad)."""
  from configs import leo_mini_llama3_8b  # pylint: disable=g-import-not-at-top
  config = leo_mini_llama3_8b.get_config("stage=3")
  assert dict(config.optimizer.lr_mults) == {"projector": 0.1}
  config.total_steps, config.optimizer.warmup_steps = 100, 0
  config.optimizer.decay, config.optimizer.clip_norm = "constant", 0.0
  lr = config.optimizer.lr
  params = {"projector": {"linear_1": {"kernel": np.ones((2, 3), np.float32)}},
            "reducer": {"cotr": {"text_proj": {"kernel": np.ones((3,), np.float32)}}},
            "llm": {"layers": {"mlp": {"mmoe_router": {"kernel": np.ones((4,), np.float32)},
                                       "gate_proj": {"kernel": np.ones((5,), np.float32)}}}}}
  updates, state = _first_updates(config, params)
  np.testing.assert_allclose(updates["projector"]["linear_1"]["kernel"], -0.1 * lr, rtol=1e-4)
  np.testing.assert_allclose(updates["reducer"]["cotr"]["text_proj"]["kernel"], -lr,
                             rtol=1e-4)
  np.testing.assert_allclose(updates["llm"]["layers"]["mlp"]["mmoe_router"]["kernel"], -lr,
                             rtol=1e-4)
  assert not np.any(updates["llm"]["layers"]["mlp"]["gate_proj"]["kernel"])
  moments = sorted(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert moments == sorted([6, 3, 4] * 2)  # Adam's two moments, trainable leaves only
  # A regex over paths scales what it matches; the first key that matches wins.
  config.optimizer.lr_mults = {"llm/[^/]+/mlp/mmoe_[a-z]+": 0.5, "main": 2.0}
  updates, _ = _first_updates(config, params)
  np.testing.assert_allclose(updates["llm"]["layers"]["mlp"]["mmoe_router"]["kernel"],
                             -0.5 * lr, rtol=1e-4)
  np.testing.assert_allclose(updates["projector"]["linear_1"]["kernel"], -2 * lr, rtol=1e-4)
