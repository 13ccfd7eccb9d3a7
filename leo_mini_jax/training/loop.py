"""The training loop: mesh, sharded state, data, jitted step, logging, checkpoints.

The same loop runs on one CPU and on a pod: `data.batch_size` is the global batch (each
process feeds batch_size / process_count rows), shardings come from abstract shapes, a
checkpoint restores on any mesh and process count, and a preemption notice (SIGTERM)
saves the step reached before a clean exit.
"""

import concurrent.futures
import contextlib
import copy
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from leo_mini_jax import batch as batch_lib
from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax import config_validation
from leo_mini_jax import run_record
from leo_mini_jax import runtime as runtime_lib
from leo_mini_jax import stages as stages_lib
from leo_mini_jax.data import packing as packing_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.models import factory
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import data_position as data_position_lib
from leo_mini_jax.training import guards as guards_lib
from leo_mini_jax.training import metrics as metrics_lib
from leo_mini_jax.training import optimizer as optimizer_lib
from leo_mini_jax.training import preemption as preemption_lib
from leo_mini_jax.training import recovery as recovery_lib
from leo_mini_jax.training import step as step_lib
from leo_mini_jax.training import workdir_lock as workdir_lock_lib

# On a 2-core CPU, collectives stall when dozens of steps are queued: block at least this often.
MAX_QUEUED_STEPS = 8
# Re-exported: the model runtime (leo_mini_jax/runtime.py) and the batch contract
# (leo_mini_jax/batch.py) own these.
ONE_SHOT_CPU_OPTIONS = runtime_lib.ONE_SHOT_CPU_OPTIONS
one_shot_jit = runtime_lib.one_shot_jit
sharding_rules = runtime_lib.sharding_rules
build_model = factory.build_model
dummy_batch = batch_lib.dummy_batch


class TrainSetup(runtime_lib.ModelRuntime):
  """The model runtime plus what only training needs: the optimizer, the train state's
  shardings (parameters and optimizer state) and the jitted step."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    super().__init__(config, mesh)
    boxed = self.abstract_boxed_params
    self.tx, self.lr_schedule = optimizer_lib.make_optimizer(config, boxed)
    self.trainable = optimizer_lib.trainable_mask(nn.unbox(boxed), config.schedule)
    batch = batch_lib.dummy_batch(config)

    def init_boxed(rng):
      params = self.model.init(rng, batch)["params"]
      return step_lib.TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    self._init_boxed = init_boxed
    # The optimizer state's shapes from the abstract params: tracing the model once more
    # (eval_shape of init_boxed) costs seconds per stage and gives the same tree.
    abstract_boxed = step_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), boxed,
                                         jax.eval_shape(self.tx.init, boxed))
    self.state_shardings = mesh_lib.logical_shardings(abstract_boxed, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(abstract_boxed), self.state_shardings)

  def init_state(self, seed: int) -> step_lib.TrainState:
    with mesh_lib.activate(self.mesh, self.rules):
      init = one_shot_jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                          out_shardings=self.state_shardings)
      return init(jax.random.PRNGKey(seed))

  def state_from_params(self, params) -> step_lib.TrainState:
    """Step 0 and a fresh optimizer state around `params` (already sharded)."""
    with mesh_lib.activate(self.mesh, self.rules):
      opt_state = one_shot_jit(self.tx.init,
                               out_shardings=self.state_shardings.opt_state)(params)
      step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
    return step_lib.TrainState(step, params, opt_state)

  def jit_train_step(self):
    step_fn = step_lib.make_train_step(
        self.model, self.tx, self.trainable, self.lr_schedule,
        int(self.config.optimizer.grad_accum_steps), dropout_seed=int(self.config.seed),
        loss_chunk_length=int((self.config.get("train") or {}).get("loss_chunk_length", 0)))
    # A NaN/inf step leaves params and optimizer state as they were (no host sync).
    step_fn = guards_lib.skip_nonfinite(step_fn, self.trainable)
    jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                     out_shardings=(self.state_shardings, self.replicated),
                     donate_argnums=0)

    def run(state, batch):
      with mesh_lib.activate(self.mesh, self.rules):
        return jitted(state, batch)
    run.lower = lambda state, batch: _lower(jitted, self, state, batch)
    return run

  def trainable_params(self, params) -> Any:
    return optimizer_lib.split_trainable(params, self.trainable)[0]


def _lower(jitted, setup, state, batch):
  with mesh_lib.activate(setup.mesh, setup.rules):
    return jitted.lower(state, batch)



def initial_state(setup: TrainSetup, checkpointer: checkpoint_lib.Checkpointer,
                  step: int | None = None) -> tuple[step_lib.TrainState, str]:
  """Resume from the workdir (checkpoint `step`, default the latest), else start from
  `init_from`, else from scratch. Every path builds the state straight in its sharding."""
  config = setup.config
  step = checkpointer.latest_step() if step is None else step
  if step is not None:
    # The latest step that restores intact; broken later ones are named and set aside.
    state, step = recovery_lib.restore_complete(checkpointer, setup.abstract_state, step)
    return state, f"resumed from step {step}"
  if config.get("init_from"):
    recovery_lib.check_init_from(config.init_from)
    allow_missing = stages_lib.STAGE_NEW_PARAMS.get(config.stage, r"$^")
    source = {}
    params, fresh = checkpoints_lib.load_params(
        config.init_from, setup.abstract_state.params,
        lambda paths: setup.init_params_subset(paths, config.seed), allow_missing,
        source=source)
    recovery_lib.warn_skipped_stage(source, config.stage)
    return setup.state_from_params(params), (
        f"initialised from {config.init_from}"
        + (f"; fresh: {len(fresh)} new parameters" if fresh else ""))
  return setup.init_state(config.seed), "initialised from scratch"


def data_start(checkpointer: checkpoint_lib.Checkpointer, step: int | None,
               config: ml_collections.ConfigDict) -> int:
  """Examples (with data.packing: packed rows) of the global stream consumed before
  `step` (0 for a fresh run)."""
  if step is None:
    return 0
  position = checkpointer.data_position(step)
  if position is None:  # a checkpoint without it: assume the batch size never changed
    logging.warning("checkpoint %d has no data position: assuming %d rows per step",
                    step, config.data.batch_size)
    return step * int(config.data.batch_size)
  consumed = data_position_lib.position_of(position, bool(config.data.get("packing")), step)
  if int(position.get("seed", config.data.seed)) != int(config.data.seed):
    logging.warning("data.seed changed from %s to %s: the resumed run reads another "
                    "order from position %d", position["seed"], config.data.seed, consumed)
  return consumed


def check_batch(config: ml_collections.ConfigDict, mesh, process_count: int | None = None
                ) -> None:
  """Fails at start, naming the fields, when the global batch cannot be split.

  Each gradient-accumulation micro-batch (data.batch_size / optimizer.grad_accum_steps
  rows) is spread over the data-parallel devices (mesh 'data' × 'fsdp'), and every
  process feeds data.batch_size / process_count rows.
  """
  batch = int(config.data.batch_size)
  accum = int(config.optimizer.grad_accum_steps)
  processes = jax.process_count() if process_count is None else process_count
  parallel = mesh_lib.data_parallel_size(mesh)
  axes = " × ".join(f"mesh.{a}={mesh.shape[a]}" for a in mesh_lib.BATCH_AXES)
  if batch % accum:
    raise ValueError(f"config.data.batch_size={batch} is not divisible by "
                     f"config.optimizer.grad_accum_steps={accum}")
  if (batch // accum) % parallel:
    raise ValueError(
        f"config.data.batch_size={batch} / config.optimizer.grad_accum_steps={accum} = "
        f"{batch // accum} rows per micro-batch do not divide over the {parallel} "
        f"data-parallel devices ({axes}); choose a batch size that is a multiple of "
        f"{parallel * accum}, or move devices to mesh.tensor")
  if batch % processes:
    raise ValueError(f"config.data.batch_size={batch} is not divisible by the "
                     f"{processes} processes (each feeds an equal share)")


def train(config: ml_collections.ConfigDict, workdir: str, *args, **kwargs
          ) -> dict[str, Any]:
  """`_train` holding the workdir's lock (process 0): a second run on it stops at start.

  What `_train` opens (checkpointer, data iterator, metrics writer, ...) it registers on
  `closing` as it opens it; however `_train` ends (done, preempted, stop_at, non-finite
  steps, any exception) they close here, newest first, before the lock is released.
  """
  lock = (workdir_lock_lib.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock, contextlib.ExitStack() as closing:
    return _train(config, workdir, *args, closing=closing, **kwargs)


def _train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
           mesh=None, stop_at: int | None = None,
           preemption: preemption_lib.PreemptionWatcher | None = None, *,
           closing: contextlib.ExitStack) -> dict[str, Any]:
  """Runs `config.total_steps` steps (resuming if the workdir has a checkpoint).

  total_steps=0 derives the length from the data: `config.num_epochs` passes over the
  records start-up validation keeps (optimizer.derived_total_steps); the learning-rate
  schedule spans the derived length and the summary's 'total_steps' reports it.

  Args:
    config: the run config.
    workdir: checkpoints, metrics.jsonl and TensorBoard events go here (local or gs://).
    progress: show a progress bar (process 0).
    mesh: overrides the mesh built from `config.mesh` (tests use a device subset).
    stop_at: stop (and checkpoint) after this step, as if interrupted; the schedules
      still span `config.total_steps`.
    preemption: the watcher asked after every step (default: a new one, which owns
      SIGTERM in a single-process run).
    closing: where what this opens is registered to be closed (see `train`).

  Returns a summary: the final state, logged history, final metrics, the TrainSetup, and
  'stopped' ('done', 'stop_at' or 'preempted').
  """
  validate_config(config, device_count=0 if mesh is not None else None)
  prepared = None
  num_visual = build_model(config).config.num_visual_tokens
  if int(config.total_steps) == 0:  # the length follows the data: validate it first
    prepared = pipeline_lib.prepare_source(config.data, split="train",
                                           num_visual_tokens=num_visual)
    packed_rows = None
    if config.data.get("packing"):
      plan = packing_lib.row_plan(prepared, config.data, config.data.seed)
      packed_rows = plan.rows_of_epochs(float(config.get("num_epochs", 1)))
    steps, how = optimizer_lib.derived_total_steps(config, prepared.num_examples,
                                                   packed_rows)
    config = copy.deepcopy(config)
    config.total_steps = steps
    logging.info("total_steps=0: %s", how)
    if jax.process_index() == 0:
      print(f"stage {config.stage}: {how}")
  run_record.ensure(config, workdir)  # first start: record; resume: same tokenizer/model
  setup = TrainSetup(config, mesh)
  check_batch(config, setup.mesh)
  logging.info("%s", mesh_lib.process_summary(setup.mesh))
  # XLA compiles the step from abstract shapes on a worker thread (compilation releases
  # the GIL) while this one initialises or restores the state and starts the data.
  compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
  compiling = compiler.submit(
      lambda: setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch())
      .compile())
  compiler.shutdown(wait=False)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  closing.callback(checkpointer.close)
  closing.callback(checkpointer.wait)  # runs first: an async save finishes before close
  latest = checkpointer.latest_step()
  state, how = initial_state(setup, checkpointer, latest)
  latest = None if latest is None else int(state.step)  # a broken latest falls back
  position = data_start(checkpointer, latest, config)  # packed rows with data.packing
  logging.info("%s (data position %d)", how, position)
  data = pipeline_lib.make_dataset(config.data, split="train", seed=config.data.seed,
                                   start_position=position, prepared=prepared,
                                   num_visual_tokens=num_visual)
  spec = data.plan.spec.as_dict() if data.plan else None  # what the row positions mean
  if data.report is not None and data.report.num_skipped:
    logging.warning("data: %s", data.report.summary())
  if latest is not None:  # the position counts examples of the stream these records make
    recovery_lib.check_data_fingerprint(checkpointer.data_position(latest),
                                        data.fingerprint, config.data.get("on_change"))
    data_position_lib.check_packing_spec(checkpointer.data_position(latest), spec,
                                         config.data.get("on_change"))
  if data.tokenizer.vocab_size > config.model.llm.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={config.model.llm.vocab_size} is smaller "
                     f"than the tokenizer's vocabulary ({data.tokenizer.vocab_size})")
  data_iter = data.iterator()
  # Grain worker processes and their shared memory go when the run ends, not whenever the
  # iterator is garbage-collected (in whatever thread, during whatever the caller runs next).
  closing.callback(data_iter.close)
  watcher = preemption or preemption_lib.PreemptionWatcher()
  if preemption is None:
    closing.callback(watcher.close)
  policy = checkpoint_lib.SavePolicy(config.checkpoint)
  start_step = int(state.step)
  recovery_lib.truncate_metrics(workdir, start_step)  # rows a killed run wrote
  # TensorBoard is rebuilt from the (truncated) metrics.jsonl: both show the same steps.
  writer = metrics_lib.MetricsWriter(workdir)
  closing.callback(writer.close)
  nonfinite = guards_lib.NonFiniteTracker(guards_lib.max_bad_steps(config))
  total = int(config.total_steps) if stop_at is None else min(stop_at, config.total_steps)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start_step, desc=f"stage {config.stage}", leave=True)
    closing.callback(bar.close)
  history, pending = [], []
  throughput = metrics_lib.Throughput()
  last_metrics: dict[str, float] = {}
  stopped = "done" if total == config.total_steps else "stop_at"
  train_step = compiling.result()  # donates the state: only the returned one is read
  batch = setup.global_batch(next(data_iter)) if start_step < total else None
  for step in range(start_step, total):
    state, metrics = train_step(state, batch)
    # The next batch is assembled and sent while the step runs (dispatch is asynchronous),
    # so the metrics fetch below never waits on the host pipeline as well.
    batch = setup.global_batch(next(data_iter)) if step + 1 < total else None
    position += int(config.data.batch_size)
    pending.append(metrics)
    done = step + 1
    reason = policy.reason(done, total, watcher.reached(done))
    if (len(pending) >= MAX_QUEUED_STEPS or done % config.log_every == 0 or reason):
      fetched = [metrics_lib.scalar_metrics(m) for m in jax.device_get(pending)]
      # Before any save below: a run that keeps diverging stops, naming the step.
      nonfinite.observe(fetched, done - len(pending) + 1)
      if throughput.start_time is None:  # the first fetch includes compilation
        throughput.start()
      else:
        throughput.add(fetched)
      pending = []
      last_metrics = fetched[-1]
      if done % config.log_every == 0 or reason in ("final", "preempted"):
        last_metrics.update(throughput.rates())
        writer.write(done, last_metrics)
        history.append({"step": done, **last_metrics})
        if bar is not None:
          bar.set_postfix(loss=f"{last_metrics['loss']:.3f}",
                          ex_s=f"{last_metrics.get('examples_per_second', 0):.1f}",
                          density=f"{last_metrics.get('density', 0):.2f}")
    if bar is not None:
      bar.update(1)
    if reason and checkpointer.latest_step() != done:
      guards_lib.check_finite_state(state, done)
      checkpointer.save(done, state, {
          **data_position_lib.position_record(position, spec),
          "seed": int(config.data.seed),
          "global_batch_size": int(config.data.batch_size),
          "process_count": jax.process_count(), "stage": int(config.stage),
          "data_fingerprint": data.fingerprint,
          "checksums": recovery_lib.state_checksums(state)})
      policy.saved()
    if reason == "preempted":
      logging.warning("preemption notice: saved step %d, stopping", done)
      stopped = "preempted"
      break
  return {"state": state, "history": history, "final": last_metrics, "setup": setup,
          "stopped": stopped, "total_steps": int(config.total_steps)}


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None
                    ) -> None:
  """train.py's call of the one validator, `config_validation.validate_config`: the
  schedule is checked on the shapes TrainSetup builds (`device_count` as there)."""
  config_validation.validate_config(config, device_count=device_count, trace_model=False)
