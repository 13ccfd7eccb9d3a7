"""The train step's loss normalisation and gradient accumulation."""

import pytest
import jax
import numpy as np

from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import step as step_lib
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


def test_micro_batches_are_strided_and_stay_on_every_device():
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from leo_mini_jax.training import step as step_lib
  micro = step_lib.split_micro({"x": np.arange(16)}, 4)["x"]
  np.testing.assert_array_equal(micro[1], [1, 5, 9, 13])  # rows m, m + steps, ...
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  rows = jax.device_put(jnp.arange(16 * 3).reshape(16, 3), NamedSharding(mesh, P("data")))
  split = jax.jit(lambda x: step_lib.split_micro({"x": x}, 2)["x"])
  out = split(rows)
  # Each of the 2 micro-batches has its 8 rows over all 4 devices (2 per device) ...
  assert out.sharding.shard_shape(out.shape) == (2, 2, 3)
  np.testing.assert_array_equal(np.asarray(out[0, :, 0]), np.arange(0, 48, 6))
  # ... and getting there moves no data between devices.
  hlo = split.lower(rows).compile().as_text()
  assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute"))


def test_train_step_donates_the_state_and_compiles_ahead_from_abstract_shapes(
    one_device_mesh):
  """The step reuses the state's buffers (no second copy of params and Adam moments),
  and the program compiled from abstract shapes (as the loop does on a worker thread)
  takes the pipeline's real batch."""
  config = small_config(2)
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  compiled = setup.jit_train_step().lower(setup.abstract_state,
                                          setup.abstract_batch()).compile()
  batch = next(pipeline_lib.make_dataset(config.data, split="train").iterator())
  old_leaves = jax.tree.leaves(state)
  # The abstract state (built from one model trace) is that of a real init.
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), state)
          == jax.tree.map(lambda x: (x.shape, x.dtype), setup.abstract_state))
  new_state, metrics = compiled(state, setup.global_batch(batch))
  assert all(x.is_deleted() for x in old_leaves)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow  # > 20 s on the 2-core CI machine
def test_lora_dropout_masks_follow_the_step_number_and_seed(one_device_mesh):
  config = small_config(3)
  config.model.llm.mmoe.lora_dropout = 0.5
  setup = loop.TrainSetup(config, one_device_mesh)
  batch = setup.global_batch(loop.dummy_batch(config, config.data.batch_size) | {
      "loss_mask": np.tile((np.arange(config.data.max_length) >= 2).astype(np.int32),
                           (config.data.batch_size, 1))})
  step = setup.jit_train_step()
  state = setup.init_state(0)
  copy = lambda s, **changes: jax.tree.map(lambda x: x.copy(), s).replace(**changes)
  states = [copy(state), copy(state), copy(state, step=state.step + 1)]
  (first, m_first), (again, m_again), (_, m_next) = [
      jax.device_get(step(s, batch)) for s in states]
  # Same step → same key → bit-identical update (a resumed run redraws the same masks).
  assert float(m_first["grad_norm"]) == float(m_again["grad_norm"])
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  # Another step number draws other masks: the gradient (not only the lr) changes.
  assert float(m_next["grad_norm"]) != float(m_first["grad_norm"])
  key = step_lib.dropout_key
  assert np.array_equal(jax.random.key_data(key(0, 5)), jax.random.key_data(key(0, 5)))
  assert not np.array_equal(key(0, 5), key(0, 6))
  assert not np.array_equal(key(0, 5), key(1, 5))


def test_a_chunked_loss_gives_the_same_step(one_device_mesh):
  config = small_config(2)
  config.optimizer.eps = 1e-3  # as above: Adam's first step would amplify rounding
  batch = next(pipeline_lib.make_dataset(config.data, split="train").iterator())
  want, want_metrics = _one_step(config, one_device_mesh, batch)
  # 5 divides no row length here: the last chunk is padding, unsupervised.
  config.train.loss_chunk_length = 5
  got, got_metrics = _one_step(config, one_device_mesh, batch)
  for key in ("loss", "token_accuracy", "supervised_tokens", "grad_norm"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_chunked_loss_never_holds_the_whole_logits():
  """The compiler's own temporaries for loss + gradient of an LM head over a 32k
  vocabulary: whole logits (and their gradient) at once against 8 chunks."""
  import jax.numpy as jnp
  batch, length, dim, vocab = 4, 256, 64, 32768
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(dim, vocab)) / 8, jnp.float32)
  aux = {"targets": jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32),
         "target_mask": jnp.asarray(rng.integers(0, 2, (batch, length)), jnp.int32)}

  def loss(head, hidden, chunk):
    logits_fn = lambda h: h @ head
    if chunk:
      return step_lib.chunked_token_losses(logits_fn, hidden, aux, chunk)[0]
    return step_lib.token_losses(logits_fn(hidden), aux)[0]

  temps, grads = {}, {}
  for chunk in (0, length // 8):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    temps[chunk] = fn.lower(head, hidden, chunk).compile().memory_analysis().temp_size_in_bytes
    grads[chunk] = fn(head, hidden, chunk)
  logits_bytes = batch * length * vocab * 4
  assert temps[0] >= logits_bytes  # the whole float32 logits
  assert temps[length // 8] < temps[0] / 4, temps  # 268 MB → 42 MB on XLA:CPU
  for a, b in zip(jax.tree.leaves(grads[length // 8]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
