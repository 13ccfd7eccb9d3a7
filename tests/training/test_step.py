"""The train step's loss normalisation and gradient accumulation."""

import jax
import numpy as np

from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def _one_step(config, mesh, batch):
  setup = loop.TrainSetup(config, mesh)
  state = setup.init_state(0)
  state, metrics = setup.jit_train_step()(state, setup.global_batch(batch))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_gradient_accumulation_matches_one_big_batch(one_device_mesh):
  config = small_config(2)
  config.optimizer.eps = 1e-3  # see test_sharded_step: keeps near-zero gradients stable
  batch = next(pipeline_lib.make_dataset(config.data, split="train").iterator())
  want, want_metrics = _one_step(config, one_device_mesh, batch)
  config.optimizer.grad_accum_steps = 4
  got, got_metrics = _one_step(config, one_device_mesh, batch)
  np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_is_the_mean_over_supervised_tokens_of_the_batch(one_device_mesh):
  config = small_config(2)
  batch = next(pipeline_lib.make_dataset(config.data, split="train").iterator())
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  logits, aux = setup.model.apply({"params": state.params}, batch)
  logits, targets = np.asarray(logits, np.float64), np.asarray(aux["targets"])
  mask = np.asarray(aux["target_mask"]).astype(bool)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                  keepdims=True)) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  want = -picked[mask].mean()
  _, metrics = setup.jit_train_step()(state, setup.global_batch(batch))
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert float(metrics["supervised_tokens"]) == mask.sum()
  assert mask.sum() == (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum()
