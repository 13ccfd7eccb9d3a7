"""Start-up checks of a run config that name the field, run by every entry point.

train.py (through `loop.validate_config`, a thin alias), eval.py, `porting.convert` and
the benchmark scripts call `validate_config` before they build anything, so a typo fails
in seconds with the config field in the message instead of hours later (or never: a
`schedule` regex that matches nothing would silently freeze the parameters it meant to
train).

The checks that need the model's parameter paths (`check_schedule`) run on abstract
shapes only (`models.factory.abstract_params`); `runtime.ModelRuntime` runs them on the
shapes it builds anyway, so train and eval trace the model once.
"""

import math
import re
from typing import Any, Sequence

from etils import epath
import jax

from leo_mini_jax import config_ranges
from leo_mini_jax.config_ranges import ConfigError  # the one error type of config checks
from leo_mini_jax.parallel.axes import MESH_AXES


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def check_experts(config: Any) -> None:
  """Every `model.experts[i].name` is a registered vision expert."""
  from leo_mini_jax.models.vision import experts as experts_lib  # pylint: disable=g-import-not-at-top
  known = experts_lib.registered_experts()
  experts = list(config.model.get("experts") or [])
  if not experts:
    _fail("model.experts", f"no vision expert; give at least one of {known}")
  for i, expert in enumerate(experts):
    name = expert.get("name") if hasattr(expert, "get") else None
    if name not in known:
      _fail(f"model.experts[{i}].name", f"unknown vision expert {name!r}; registered "
            f"experts are {known}")


def check_reducer(config: Any) -> None:
  """A token-reducing `model.reducer` keeps at least one token per expert."""
  reducer = config.model.get("reducer") or {}
  kind = reducer.get("kind", "none")
  if kind != "none":
    tokens = reducer.get("num_visual_tokens")
    if not isinstance(tokens, int) or tokens < 1:
      _fail("model.reducer.num_visual_tokens",
            f"must be an integer >= 1 for reducer.kind={kind!r}, got {tokens!r}")
  elif int(reducer.get("grid_size", 1)) < 1:
    _fail("model.reducer.grid_size", f"must be >= 1, got {reducer.get('grid_size')!r}")


def check_mmoe(config: Any) -> None:
  """Stage 3 (CoTR + MMoE-LLM, Table 6) needs a complete, enabled `model.llm.mmoe`."""
  if config.stage != 3:
    return
  mmoe = config.model.llm.get("mmoe")
  if not mmoe:
    _fail("model.llm.mmoe", "stage 3 trains MMoE-LLM but the section is missing "
          "(see configs/common.py: mmoe_config)")
  if not mmoe.get("enabled"):
    _fail("model.llm.mmoe.enabled", "must be True in stage 3 (its schedule trains "
          "llm/.*/mmoe_.* parameters)")
  for field in ("num_experts", "rank", "top_k"):
    value = mmoe.get(field)
    if not isinstance(value, int) or value < 1:
      _fail(f"model.llm.mmoe.{field}", f"must be an integer >= 1 in stage 3, got {value!r}")
  if mmoe.top_k > mmoe.num_experts:
    _fail("model.llm.mmoe.top_k", f"{mmoe.top_k} exceeds mmoe.num_experts="
          f"{mmoe.num_experts}")


def check_mesh(config: Any, device_count: int) -> None:
  """`mesh` (ICI sizes, one may be -1, times `mesh.dcn`) covers exactly the devices."""
  mesh = config.get("mesh") or {}
  sizes = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
  dcn = {axis: int((mesh.get("dcn") or {}).get(axis, 1)) for axis in MESH_AXES}
  if any(s == 0 or s < -1 for s in sizes.values()):
    _fail("mesh", f"axis sizes must be >= 1 or -1 (the rest), got {sizes}")
  if list(sizes.values()).count(-1) > 1:
    _fail("mesh", f"at most one axis may be -1, got {sizes}")
  if any(s < 1 for s in dcn.values()):
    _fail("mesh.dcn", f"sizes must be >= 1, got {dcn}")
  known = math.prod(s for s in sizes.values() if s != -1) * math.prod(dcn.values())
  if -1 in sizes.values():
    if device_count % known:
      _fail("mesh", f"{sizes} with dcn {dcn}: the other axes need a multiple of {known} "
            f"devices, have {device_count}")
  elif known != device_count:
    _fail("mesh", f"{sizes} with dcn {dcn} needs {known} devices, have {device_count}; "
          "set one axis to -1 to take the rest")


def check_schedule(schedule: Sequence[Sequence[Any]], paths: Sequence[str],
                   optional: Sequence[Sequence[Any]] | None = None) -> None:
  """Every `schedule` rule compiles and is the first match of at least one parameter.

  A rule that matches nothing is almost always a typo, and the catch-all rule behind it
  would then freeze what it meant to train without any other sign.

  Args:
    schedule: (regex, group or None) rules, first match wins.
    paths: the model's parameter paths.
    optional: rules that may match nothing (default: the built-in Table 6 rules of every
      stage and SAM_NECK_RULE, which name modules only some expert sets have).
  """
  if optional is None:
    from leo_mini_jax import stages  # pylint: disable=g-import-not-at-top
    optional = stages.builtin_rules()
  optional = {tuple(rule) for rule in optional}
  compiled = []
  for i, rule in enumerate(schedule):
    if len(rule) != 2:
      _fail(f"schedule[{i}]", f"expected (regex, group or None), got {tuple(rule)!r}")
    try:
      compiled.append(re.compile(rule[0]))
    except re.error as e:
      _fail(f"schedule[{i}]", f"regex {rule[0]!r} does not compile: {e}")
  first = [0] * len(compiled)
  matched = [0] * len(compiled)
  for path in paths:
    hits = [i for i, r in enumerate(compiled) if r.fullmatch(path)]
    for i in hits:
      matched[i] += 1
    if hits:
      first[hits[0]] += 1
  for i, rule in enumerate(schedule):
    if tuple(rule) in optional:
      continue
    if not matched[i]:
      example = ", ".join(sorted(paths)[:3])
      _fail(f"schedule[{i}]", f"regex {rule[0]!r} matches no parameter (paths look like "
            f"{example}, ...)")
    if not first[i]:
      _fail(f"schedule[{i}]", f"regex {rule[0]!r} only matches parameters that an "
            "earlier rule already claims (first match wins)")


def parameter_paths(config: Any) -> list[str]:
  """The model's parameter paths ('llm/layers/...'), from abstract shapes only."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.models import factory  # pylint: disable=g-import-not-at-top
  params = factory.abstract_params(config, boxed=False)
  return list(traverse_util.flatten_dict(params, sep="/"))


def check_optimizer(config: Any) -> None:
  """Gradient accumulation splits the batch evenly; the decay is one the schedule knows."""
  optimizer = config.get("optimizer") or {}
  batch_size, accum = config.data.batch_size, optimizer.get("grad_accum_steps", 1)
  if batch_size % accum:
    _fail("optimizer.grad_accum_steps", f"must divide data.batch_size={batch_size}")
  if optimizer.get("decay", "cosine") not in ("cosine", "constant"):
    _fail("optimizer.decay", "must be 'cosine' or 'constant'")


def check_packing(config: Any, num_visual_tokens: int) -> None:
  """With data.packing every image slot of a row can be filled: when max_length counts
  visual tokens, a row holds at most max_length // N^V images, and slots beyond that only
  cost vision-encoder work on empty images."""
  data = config.get("data") or {}
  if not data.get("packing") or not data.get("max_length_counts_visual_tokens"):
    return
  fit = int(data.max_length) // max(int(num_visual_tokens), 1)
  if fit < 1:
    _fail("data.max_length", f"{data.max_length} holds no image of {num_visual_tokens} "
          "visual tokens (data.max_length_counts_visual_tokens=True)")
  if int(data.max_images_per_row) > fit:
    _fail("data.max_images_per_row", f"{data.max_images_per_row} image slots, but at most "
          f"{fit} images of {num_visual_tokens} visual tokens fit data.max_length="
          f"{data.max_length} (data.max_length_counts_visual_tokens=True); set it to "
          f"{fit} or less")


def check_vision_passes(config: Any) -> None:
  """`model.vision_passes` divides a training micro-batch's images (else the model would
  quietly run fewer passes: their greatest common divisor)."""
  passes = int(config.model.get("vision_passes", 1))
  if passes == 1:
    return
  data, optimizer = config.get("data") or {}, config.get("optimizer") or {}
  slots = int(data.get("max_images_per_row", 1)) if data.get("packing") else 1
  rows = int(data.batch_size) // int(optimizer.get("grad_accum_steps", 1))
  if (rows * slots) % passes:
    _fail("model.vision_passes", f"{passes} passes do not divide the {rows * slots} "
          f"images of a training micro-batch ({rows} rows = data.batch_size / "
          f"optimizer.grad_accum_steps, × {slots} image slots)")


def check_tokenizer(config: Any) -> None:
  """The tokenizer's vocabulary fits `model.llm.vocab_size` (larger ids would embed as
  NaN: `jnp.take` fills out-of-range rows)."""
  path = (config.get("data") or {}).get("tokenizer")
  if not path:
    return  # full-size configs leave it for the user; the pipeline names it when used
  from leo_mini_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = tokenizers.load_tokenizer(str(path))
  except (OSError, ValueError) as e:
    _fail("data.tokenizer", str(e))
  vocab = int(config.model.llm.vocab_size)
  if tokenizer.vocab_size > vocab:
    _fail("data.tokenizer", f"{path!r} has {tokenizer.vocab_size} tokens, more than "
          f"config.model.llm.vocab_size={vocab}")


def check_init_from(config: Any) -> None:
  path = config.get("init_from")
  if path and not epath.Path(path).exists():
    _fail("init_from", f"{path} does not exist")


def validate_config(config: Any, *, device_count: int | None = None,
                    paths: Sequence[str] | None = None, trace_model: bool = True,
                    init_from: bool = True) -> None:
  """Raises ConfigError, naming the field, for a config that cannot run.

  Args:
    config: a run config (configs/*.py).
    device_count: devices the mesh must cover (default `jax.device_count()`); 0 skips
      the mesh check (callers that build their own mesh, conversion).
    paths: the model's parameter paths for the schedule check; None with
      `trace_model` computes them (one abstract trace of the model).
    trace_model: False skips the schedule check when `paths` is None (the caller runs
      `check_schedule` itself, as `runtime.ModelRuntime` does).
    init_from: check that `init_from` exists (False for evaluation, which reads the
      run's own checkpoints).
  """
  if config.get("stage") not in (1, 2, 3):
    _fail("stage", f"must be 1, 2 or 3, got {config.get('stage')!r}")
  config_ranges.check_ranges(config)  # every numeric field (one table), before any use
  check_optimizer(config)
  check_experts(config)
  check_reducer(config)
  check_mmoe(config)
  if device_count is None:
    device_count = jax.device_count()
  if device_count:
    check_mesh(config, device_count)
  check_tokenizer(config)
  if init_from:
    check_init_from(config)
  from leo_mini_jax.models import leo_mini  # pylint: disable=g-import-not-at-top
  model_config = leo_mini.LeoMiniConfig.from_config(config.model)  # names bad fields
  check_packing(config, model_config.num_visual_tokens)
  check_vision_passes(config)
  if paths is None and trace_model:
    paths = parameter_paths(config)
  if paths is not None:
    check_schedule(config.schedule, paths)
