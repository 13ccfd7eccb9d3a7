"""The pure train step: loss, gradients of the trainable subset only, optimizer update.

The loss is next-token cross-entropy on assistant tokens, averaged over the supervised
tokens of the whole global batch (also under gradient accumulation: micro-batch sums are
added up before dividing), plus the MMoE balance loss in stage 3.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from leo_mini_jax.parallel import strided
from leo_mini_jax.training import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def token_losses(logits: jax.Array, aux: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed cross-entropy, number of supervised tokens, number of correct argmaxes."""
  mask = aux["target_mask"].astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, aux["targets"])
  correct = (jnp.argmax(logits, -1) == aux["targets"]).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(correct * mask)


def chunked_token_losses(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                         aux: dict, chunk_length: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_losses` of `logits_fn(hidden)` without ever holding the whole logits.

  The sequence goes through the LM head `chunk_length` positions at a time (a scan;
  each chunk's logits are recomputed for the backward pass), so the [B, T, vocab] float32
  logits and their gradient — at Llama-3's 128k vocabulary the largest arrays of the
  step — take T / chunk_length less memory, for one extra head matmul.
  """
  batch, length = hidden.shape[:2]
  pad = -length % chunk_length

  def by_chunk(x):  # [B, T, ...] → [T / chunk, B, chunk, ...], padding unsupervised
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((batch, -1, chunk_length) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def add_chunk(totals, chunk):
    hidden_chunk, targets, mask = chunk
    sums = token_losses(logits_fn(hidden_chunk), {"targets": targets, "target_mask": mask})
    return tuple(t + s for t, s in zip(totals, sums)), None

  zero = jnp.zeros((), jnp.float32)
  totals, _ = jax.lax.scan(add_chunk, (zero, zero, zero),
                           (by_chunk(hidden), by_chunk(aux["targets"]),
                            by_chunk(aux["target_mask"])))
  return totals


def forward_losses(model: nn.Module, params: Any, batch: dict, loss_chunk_length: int = 0,
                   **apply_kwargs) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict]:
  """The model's forward on `batch` → ((loss sum, supervised tokens, correct), aux);
  with loss_chunk_length > 0 through `chunked_token_losses`."""
  variables = {"params": params}
  if not loss_chunk_length:
    logits, aux = model.apply(variables, batch, **apply_kwargs)
    return token_losses(logits, aux), aux
  hidden, aux = model.apply(variables, batch, return_hidden=True, **apply_kwargs)
  logits_fn = lambda h: model.apply(variables, h, method=model.logits)
  return chunked_token_losses(logits_fn, hidden, aux, loss_chunk_length), aux


def num_examples(batch: dict) -> jax.Array:
  """Real examples in a batch: one per row, or per segment of packed rows."""
  if "segment_ids" in batch:
    return jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32)
  return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def split_micro(batch: dict, steps: int) -> dict:
  """[N, ...] leaves → [steps, N / steps, ...]; micro-batch m holds rows m, m + steps, ...
  (strided, so each micro-batch stays on every data-parallel device: parallel/strided.py).
  """
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                       f"optimizer.grad_accum_steps={steps}")
    return strided.strided_split(x, steps)
  return jax.tree.map(split, batch)


# Separates the dropout stream from parameter init, which uses PRNGKey(seed) itself.
DROPOUT_STREAM = 0x0D0


def dropout_key(seed: int, step: jax.Array, micro_batch: jax.Array | int = 0) -> jax.Array:
  """The 'dropout' RNG of optimizer step `step` (and micro-batch): a function of the
  config seed and the step number only, so a resumed run draws the same masks."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), DROPOUT_STREAM)
  return jax.random.fold_in(jax.random.fold_in(base, step), micro_batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    trainable: Any, lr_schedule: optax.Schedule,
                    grad_accum_steps: int = 1, dropout_seed: int = 0,
                    loss_chunk_length: int = 0) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` (jit it with shardings).

  Args:
    model: LeoMini.
    tx: from `optimizer.make_optimizer`.
    trainable: bool tree over params (True = trained).
    lr_schedule: base schedule, for the metric.
    grad_accum_steps: micro-batches per update.
    dropout_seed: seed of the dropout masks (`dropout_key`; used by mmoe.lora_dropout).
    loss_chunk_length: > 0: the loss takes the LM head this many positions at a time
      (`chunked_token_losses`; config.train.loss_chunk_length).
  """

  def sums(trainable_params, frozen_params, batch, key):
    params = optimizer_lib.merge_trainable(trainable_params, frozen_params)
    (loss_sum, count, correct), aux = forward_losses(model, params, batch, loss_chunk_length,
                                                     rngs={"dropout": key})
    routing = aux["routing"].get("expert_fraction")
    return loss_sum, (count, correct, aux["balance_loss"], routing,
                      jnp.sum(aux["attention_mask"]), num_examples(batch),
                      jnp.asarray(aux["attention_mask"].size, jnp.float32))

  def objective(trainable_params, frozen_params, batch, total_count, key):
    loss_sum, extra = sums(trainable_params, frozen_params, batch, key)
    balance = extra[2]
    return loss_sum / total_count + balance / grad_accum_steps, (loss_sum, extra)

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    trainable_params, frozen_params = optimizer_lib.split_trainable(state.params, trainable)
    # The data contract: position 0 (BOS or the placeholder) is never supervised.
    supervised = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    total_count = jnp.maximum(jnp.sum(supervised), 1).astype(jnp.float32)
    if grad_accum_steps == 1:
      grads, (loss_sum, extra) = grad_fn(trainable_params, frozen_params, batch, total_count,
                                         dropout_key(dropout_seed, state.step))
    else:
      micro = split_micro(batch, grad_accum_steps)

      def body(carry, inputs):
        grads_acc, stats = carry
        micro_batch, index = inputs
        g, (l, e) = grad_fn(trainable_params, frozen_params, micro_batch, total_count,
                            dropout_key(dropout_seed, state.step, index))
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        stats = jax.tree.map(jnp.add, stats, (l, e))
        return (grads_acc, stats), None

      zeros = jax.tree.map(jnp.zeros_like, trainable_params)
      first = jax.eval_shape(lambda: sums(trainable_params, frozen_params,
                                          jax.tree.map(lambda x: x[0], micro),
                                          dropout_key(dropout_seed, state.step)))
      stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
      (grads, (loss_sum, extra)), _ = jax.lax.scan(
          body, (zeros, stats0), (micro, jnp.arange(grad_accum_steps)))
      extra = extra[:2] + (extra[2] / grad_accum_steps,
                           None if extra[3] is None else extra[3] / grad_accum_steps,
                           ) + extra[4:]
    count, correct, balance, routing, num_tokens, examples, capacity = extra
    # Frozen leaves: zeros that the update never reads (multi_transform → set_to_zero).
    full_grads = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g,
                              grads, state.params, is_leaf=lambda x: x is None)
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u, m: optax.apply_updates(p, u) if m else p,
                              state.params, updates, trainable)
    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "token_accuracy": correct / jnp.maximum(count, 1.0),
        "balance_loss": balance,
        "grad_norm": optax.global_norm([g for g in jax.tree.leaves(grads)]),
        "lr": lr_schedule(state.step),
        "supervised_tokens": count,
        "tokens": num_tokens,
        "examples": examples,
        # Real LLM tokens per position the step computed: what packing raises.
        "density": num_tokens / capacity,
    }
    if routing is not None:
      metrics["routing_fraction"] = routing  # [layers, experts]
    return TrainState(state.step + 1, new_params, opt_state), metrics

  return train_step
