"""The optimizer built from the training stage's rules (`config.schedule`, see
`leo_mini_jax/stages.py` for the rules of paper Table 6).

`config.schedule` is a list of (regex over the parameter path, group) pairs; the first
match wins, `None` means frozen, every path must match one rule. Each group trains with
AdamW at `optimizer.lr`. `optimizer.lr_mults` scales parts of it: a key is a group name, a
module (the first parts of a path: 'projector', 'llm/layers/mlp') or a regex over paths,
and a trainable parameter takes the multiplier of the first key that names it (e.g.
{'projector': 0.1}: LLaVA-1.5's LoRA recipe trains the projector at 2e-5 beside LoRA at
2e-4; ConfigDict keys cannot hold dots, so write `[^/]*` where a regex would use `.*`).
Such parameters form their own AdamW transform. Frozen parameters get no optimizer
state (`optax.multi_transform` with `optax.set_to_zero`, not `optax.masked`, which would
still allocate Adam moments) and, in the train step, no gradient computation.
"""

import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"

# No weight decay on norms, biases, learned queries and position/class embeddings.
DEFAULT_NO_DECAY = (r".*/bias$", r".*/scale$", r".*_queries$", r".*position_embedding.*",
                    r".*class_embedding.*")


def path_str(path: Sequence[Any]) -> str:
  """A jax key path → 'llm/layers/mlp/gate_proj/kernel' (box attributes skipped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    # GetAttrKey('value') of nn.LogicallyPartitioned boxes is not part of the name.
  return "/".join(parts)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def map_paths(fn: Callable[[str], Any], params: Any) -> Any:
  """Applies fn(path) to every leaf of a (boxed or plain) parameter tree."""
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_str(path)), params)


def group_of(path: str, schedule: Sequence[tuple[str, str | None]]) -> str:
  for pattern, group in schedule:
    if re.fullmatch(pattern, path):
      return FROZEN if group is None else group
  raise ValueError(f"schedule: parameter {path!r} matches no rule; end the schedule with a "
                   "catch-all rule ('.*', None)")


def param_labels(params: Any, schedule: Sequence[tuple[str, str | None]]) -> Any:
  return map_paths(lambda p: group_of(p, schedule), params)


def lr_mult_key(path: str, group: str, keys: Sequence[str]) -> int | None:
  """Index of the first `lr_mults` key naming the parameter's group, one of its modules
  (a path prefix) or matching its path as a regex; None if none does."""
  for index, key in enumerate(keys):
    if key == group or re.fullmatch(f"(?:{key})(?:/.*)?", path):
      return index
  return None


def _label(path: str, schedule, mult_keys: Sequence[str]) -> tuple[str, int | None]:
  group = group_of(path, schedule)
  if group == FROZEN:
    return FROZEN, None
  index = lr_mult_key(path, group, mult_keys)
  return (group, None) if index is None else (f"{group}_lr{index}", index)


def optimizer_labels(params: Any, schedule: Sequence[tuple[str, str | None]],
                     mult_keys: Sequence[str]) -> Any:
  """Per leaf: FROZEN, its group, or '<group>_lr<k>' when lr_mults key k scales it."""
  return map_paths(lambda path: _label(path, schedule, mult_keys)[0], params)


def trainable_mask(params: Any, schedule) -> Any:
  return map_paths(lambda p: group_of(p, schedule) != FROZEN, params)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
  patterns = [re.compile(p) for p in no_decay]
  return map_paths(lambda p: not any(r.fullmatch(p) for r in patterns), params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to `min_lr_ratio × lr` (or constant).

  `warmup_steps` < 1 is a fraction of `total_steps`. Step s uses the schedule at s + 1, so
  the first update already moves (lr/warmup) and the last one reaches the end value.
  """
  warmup = int(opt.warmup_steps if opt.warmup_steps >= 1 else opt.warmup_steps * total_steps)
  if opt.decay == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)],
        [warmup]) if warmup else optax.constant_schedule(opt.lr)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio)
  return lambda step: schedule(step + 1)


def derived_total_steps(config: ml_collections.ConfigDict, num_records: int
                        ) -> tuple[int, str]:
  """(optimizer steps, a line saying how) for `config.num_epochs` passes over
  `num_records` usable records (what start-up validation kept, all processes together).

  `data.batch_size` is the global batch of one optimizer step: the shares of every process
  and every gradient-accumulation micro-batch together, so neither changes the count. A
  pass that does not fill its last batch completes it with the next pass's records (the
  reference trainers round the steps per epoch up too), so each record is seen at least
  `num_epochs` times.
  """
  epochs = float(config.get("num_epochs", 1))
  batch = int(config.data.batch_size)
  steps = max(1, math.ceil(num_records * epochs / batch))
  accum = int(config.optimizer.grad_accum_steps)
  how = (f"{num_records} records × {epochs:g} epochs / batch {batch} → {steps} steps"
         + (f" ({accum} accumulation micro-batches of {batch // accum} rows each)"
            if accum > 1 else ""))
  return steps, how


def make_optimizer(config: ml_collections.ConfigDict, params: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW per trainable group, set_to_zero for frozen, global-norm clipping first.

  Args:
    config: the run config (uses `schedule`, `optimizer`, `total_steps`).
    params: parameter tree (boxed or plain) used to build the labels.

  Returns:
    the transformation and the base learning-rate schedule (for logging).
  """
  opt = config.optimizer
  schedule = tuple((p, g) for p, g in config.schedule)
  mults = dict(opt.get("lr_mults") or {})
  keys = tuple(mults)
  label_mults, used = {}, set()  # trainable label → its multiplier; keys that apply
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    label, index = _label(path_str(path), schedule, keys)
    if label != FROZEN:
      label_mults[label] = 1.0 if index is None else float(mults[keys[index]])
      used.add(index)
  base_lr = learning_rate_schedule(opt, config.total_steps)
  unknown = [key for index, key in enumerate(keys) if index not in used]
  if unknown:
    groups = sorted(set(jax.tree.leaves(param_labels(params, schedule))) - {FROZEN})
    raise ValueError(f"optimizer.lr_mults: key(s) {unknown} name no trainable parameter "
                     f"(not a trainable group {groups}, module or path regex)")
  transforms = {FROZEN: optax.set_to_zero()}
  for label, mult in sorted(label_mults.items()):
    transforms[label] = optax.adamw(
        lambda step, m=mult: base_lr(step) * m, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda p: decay_mask(p, tuple(opt.no_decay)))
  tx = optax.multi_transform(transforms, lambda p: optimizer_labels(p, schedule, keys))
  if opt.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  return tx, base_lr


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
  """Plain params → (trainable, frozen) trees; the other side's leaves are None."""
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def default_optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0.03, decay="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, clip_norm=1.0, grad_accum_steps=1, lr_mults={},
      no_decay=DEFAULT_NO_DECAY))


def count_leaves_bytes(tree: Any) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))
