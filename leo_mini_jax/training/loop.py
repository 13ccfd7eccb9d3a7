"""The training loop: mesh, sharded state, data, jitted step, logging, checkpoints."""

import json
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import optimizer as optimizer_lib
from leo_mini_jax.training import step as step_lib

# On a 2-core CPU, collectives stall when dozens of steps are queued: block at least this often.
MAX_QUEUED_STEPS = 8


def build_model(config: ml_collections.ConfigDict) -> leo_mini_lib.LeoMini:
  return leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config.model))


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
  """A zero batch with the pipeline's shapes (for init and abstract compilation)."""
  length, resolution = config.data.max_length, config.data.resolution
  ids = np.zeros((batch_size, length), np.int32)
  ids[:, 1] = conversation_lib.IMAGE_PLACEHOLDER_ID
  return {
      "input_ids": ids,
      "attention_mask": np.ones((batch_size, length), np.int32),
      "loss_mask": np.zeros((batch_size, length), np.int32),
      "instruction_mask": np.zeros((batch_size, length), np.int32),
      "image": np.zeros((batch_size, resolution, resolution, 3), np.uint8),
      "has_image": np.ones((batch_size,), bool),
  }


def sharding_rules(config) -> tuple:
  rules = config.get("sharding_rules")
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules) if rules else (
      mesh_lib.DEFAULT_RULES)


class TrainSetup:
  """Everything derived from the config that the step and checkpoints need.

  Shardings come from the abstract state (`jax.eval_shape`), never from materialised
  arrays, so the same code sizes an 8B run's state before allocating anything.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.mesh = mesh or mesh_lib.make_mesh(dict(config.mesh))
    self.rules = sharding_rules(config)
    self.model = build_model(config)
    batch = dummy_batch(config)
    boxed = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), batch))["params"]
    self.tx, self.lr_schedule = optimizer_lib.make_optimizer(config, boxed)
    self.trainable = optimizer_lib.trainable_mask(nn.unbox(boxed), config.schedule)

    def init_boxed(rng):
      params = self.model.init(rng, batch)["params"]
      return step_lib.TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    self._init_boxed = init_boxed
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    self.state_shardings = mesh_lib.logical_shardings(abstract_boxed, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(abstract_boxed), self.state_shardings)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, P())

  def init_state(self, seed: int) -> step_lib.TrainState:
    with self.mesh, mesh_lib.logical_axis_rules(self.rules):
      init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                     out_shardings=self.state_shardings)
      return init(jax.random.PRNGKey(seed))

  def jit_train_step(self):
    step_fn = step_lib.make_train_step(
        self.model, self.tx, self.trainable, self.lr_schedule,
        int(self.config.optimizer.grad_accum_steps))
    jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                     out_shardings=(self.state_shardings, self.replicated),
                     donate_argnums=0)

    def run(state, batch):
      with self.mesh, mesh_lib.logical_axis_rules(self.rules):
        return jitted(state, batch)
    run.lower = lambda state, batch: _lower(jitted, self, state, batch)
    return run

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    local = {k: local_batch[k] for k in pipeline_lib.BATCH_KEYS}
    return mesh_lib.make_global_batch(local, self.mesh)

  def trainable_params(self, params) -> Any:
    return optimizer_lib.split_trainable(params, self.trainable)[0]


def _lower(jitted, setup, state, batch):
  with setup.mesh, mesh_lib.logical_axis_rules(setup.rules):
    return jitted.lower(state, batch)


class MetricsWriter:
  """Scalars to TensorBoard event files and a JSONL file in the workdir (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.jsonl = None
    self.tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    if self.tensorboard is not None:
      for name, value in scalars.items():
        self.tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.jsonl:
      self.jsonl.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """Device metrics → flat floats (routing fractions as routing/layer_L/expert_E)."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if name == "routing_fraction":
      for layer, row in enumerate(value):
        for expert, fraction in enumerate(row):
          out[f"routing/layer_{layer}/expert_{expert}"] = float(fraction)
    else:
      out[name] = float(value)
  return out


def initial_state(setup: TrainSetup, checkpointer: checkpoint_lib.Checkpointer,
                  data_iter) -> tuple[step_lib.TrainState, str]:
  """Resume from the workdir, else start from `init_from`, else from scratch."""
  config = setup.config
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, setup.abstract_state, data_iter)
    return state, f"resumed from step {latest}"
  state = setup.init_state(config.seed)
  if config.get("init_from"):
    allow_missing = optimizer_lib.STAGE_NEW_PARAMS.get(config.stage, r"$^")
    abstract_params = setup.abstract_state.params
    params, fresh = checkpoint_lib.load_params(config.init_from, abstract_params,
                                               state.params, allow_missing)
    state = state.replace(params=params)
    return state, (f"initialised from {config.init_from}"
                   + (f"; fresh: {len(fresh)} new parameters" if fresh else ""))
  return state, "initialised from scratch"


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
          mesh=None, stop_at: int | None = None) -> dict[str, Any]:
  """Runs `config.total_steps` steps (resuming if the workdir has a checkpoint).

  Args:
    config: the run config.
    workdir: checkpoints, metrics.jsonl and TensorBoard events go here.
    progress: show a progress bar.
    mesh: overrides the mesh built from `config.mesh` (tests use a device subset).
    stop_at: stop (and checkpoint) after this step, as if interrupted; the schedules
      still span `config.total_steps`.

  Returns a summary: the final state, logged history, final metrics and the TrainSetup.
  """
  validate_config(config)
  setup = TrainSetup(config, mesh)
  data = pipeline_lib.make_dataset(config.data, split="train", seed=config.data.seed)
  if data.report is not None and data.report.num_skipped:
    logging.warning("data: %s", data.report.summary())
  if data.tokenizer.vocab_size > config.model.llm.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={config.model.llm.vocab_size} is smaller "
                     f"than the tokenizer's vocabulary ({data.tokenizer.vocab_size})")
  data_iter = data.iterator()
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  state, how = initial_state(setup, checkpointer, data_iter)
  logging.info("%s", how)
  train_step = setup.jit_train_step()
  writer = MetricsWriter(workdir)
  start_step = int(state.step)
  total = int(config.total_steps) if stop_at is None else min(stop_at, config.total_steps)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start_step, desc=f"stage {config.stage}", leave=False)
  history, pending = [], []
  timer_start, timer_steps, timer_tokens, timer_examples = None, 0, 0.0, 0
  last_metrics: dict[str, float] = {}
  for step in range(start_step, total):
    batch = setup.global_batch(next(data_iter))
    state, metrics = train_step(state, batch)
    pending.append(metrics)
    done = step + 1
    if len(pending) >= MAX_QUEUED_STEPS or done % config.log_every == 0 or done == total:
      fetched = [scalar_metrics(m) for m in jax.device_get(pending)]
      pending = []
      if timer_start is None:  # the first fetch includes compilation: start timing after it
        timer_start = time.perf_counter()
      else:
        timer_steps += len(fetched)
        timer_tokens += sum(m["tokens"] for m in fetched)
        timer_examples += len(fetched) * config.data.batch_size
      last_metrics = fetched[-1]
      if done % config.log_every == 0 or done == total:
        elapsed = time.perf_counter() - timer_start
        if timer_steps and elapsed > 0:
          last_metrics["tokens_per_second"] = timer_tokens / elapsed
          last_metrics["examples_per_second"] = timer_examples / elapsed
        writer.write(done, last_metrics)
        history.append({"step": done, **last_metrics})
        if bar is not None:
          bar.set_postfix(loss=f"{last_metrics['loss']:.3f}")
    if bar is not None:
      bar.update(1)
    if config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0:
      checkpointer.save(done, state, data_iter)
  if checkpointer.latest_step() != total:
    checkpointer.save(total, state, data_iter)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if bar is not None:
    bar.close()
  return {"state": state, "history": history, "final": last_metrics, "setup": setup}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the field, on values that would fail later."""
  def need(condition, field, message):
    if not condition:
      raise ValueError(f"config.{field}: {message}")
  need(config.stage in (1, 2, 3), "stage", f"must be 1, 2 or 3, got {config.stage!r}")
  need(config.total_steps >= 1, "total_steps", "must be >= 1")
  need(config.log_every >= 1, "log_every", "must be >= 1")
  need(config.optimizer.lr > 0, "optimizer.lr", "must be > 0")
  need(config.optimizer.grad_accum_steps >= 1, "optimizer.grad_accum_steps", "must be >= 1")
  need(config.data.batch_size % config.optimizer.grad_accum_steps == 0,
       "optimizer.grad_accum_steps",
       f"must divide data.batch_size={config.data.batch_size}")
  need(config.optimizer.decay in ("cosine", "constant"), "optimizer.decay",
       "must be 'cosine' or 'constant'")
  need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  leo_mini_lib.LeoMiniConfig.from_config(config.model)  # names bad model fields
  if config.model.llm.vocab_size < 1:
    raise ValueError("config.model.llm.vocab_size: must be >= 1")
