"""A run remembers what it is: the resolved config and the identity of what it trained.

On its first start a run writes into its workdir

    config.json   the resolved config (every field, after command-line overrides)
    run.json      its identity: the tokenizer (path and a SHA-256 of its files), the
                  chat template, the image resolution and the model's shape fields

`eval.py`, `ask` and a resumed `train.py` start from config.json when no --config is
given (overrides still apply on top, see `saved_config.py`). Whatever config they end up
with is compared with run.json: another tokenizer, template or model shape stops them
with every difference named, both values side by side. Fields that do not change what
the weights mean (batch size, steps, learning rate, dtypes, remat, data paths) may
differ freely.
"""

import hashlib
import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections

from leo_mini_jax import errors

CONFIG_FILE = "config.json"
IDENTITY_FILE = "run.json"
# The files of a tokenizer folder that decide its ids (model weights in the same folder
# are not hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# Model fields that change how the model computes, not what its weights mean.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers",
                        "remat_policy", "balance_coef")


class RunMismatchError(errors.UserError):
  """The config given contradicts the run's own record."""


def _is_runtime(path: str) -> bool:
  return path.rsplit(".", 1)[-1] in RUNTIME_MODEL_FIELDS


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for key, item in value.items():
      out.update(_flatten(item, f"{prefix}.{key}"))
    return out
  if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
    out = {}
    for index, item in enumerate(value):
      out.update(_flatten(item, f"{prefix}[{index}]"))
    return out
  return {prefix: list(value) if isinstance(value, tuple) else value}


def tokenizer_identity(path: str) -> dict[str, Any]:
  """{'path', 'sha256'} of data.tokenizer ('' / 'byte': the byte tokenizer)."""
  if not path or path == "byte":
    return {"path": "byte", "sha256": "byte"}
  root = epath.Path(path)
  if root.is_dir():
    files = [root / name for name in TOKENIZER_FILES if (root / name).exists()]
  elif root.exists():
    files = [root] + [root.parent / name for name in TOKENIZER_FILES[2:]
                      if (root.parent / name).exists()]
  else:
    return {"path": path, "sha256": None}
  digest = hashlib.sha256()
  for file in files:
    digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
  return {"path": path, "sha256": digest.hexdigest()}


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What must match for a config to describe this run's weights."""
  model = _flatten(json.loads(config.model.to_json()), "model")
  return {
      "tokenizer": tokenizer_identity(config.data.get("tokenizer") or ""),
      "data.template": config.data.get("template"),
      "data.system_prompt": config.data.get("system_prompt"),
      "data.resolution": config.data.get("resolution"),
      "model": {k: v for k, v in model.items() if not _is_runtime(k)},
  }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """One line per contradiction, naming the field, the run's value and the given one."""
  lines = []
  run_tok, given_tok = saved["tokenizer"], current["tokenizer"]
  if (run_tok["sha256"] != given_tok["sha256"]
      and None not in (run_tok["sha256"], given_tok["sha256"])):
    lines.append(f"data.tokenizer: the run was trained with {run_tok['path']} "
                 f"(sha256 {run_tok['sha256'][:12]}), the config gives "
                 f"{given_tok['path']} (sha256 {given_tok['sha256'][:12]})")
  elif run_tok["sha256"] is None and given_tok["path"] != run_tok["path"]:
    lines.append(f"data.tokenizer: the run was trained with {run_tok['path']}, the "
                 f"config gives {given_tok['path']}")
  for key in ("data.template", "data.system_prompt", "data.resolution"):
    if saved.get(key) != current.get(key):
      lines.append(f"{key}: the run has {saved.get(key)!r}, the config gives "
                   f"{current.get(key)!r}")
  run_model, given_model = saved["model"], current["model"]
  for key in sorted(set(run_model) | set(given_model)):
    if run_model.get(key) != given_model.get(key):
      lines.append(f"{key}: the run has {run_model.get(key, '(absent)')!r}, the config "
                   f"gives {given_model.get(key, '(absent)')!r}")
  return lines


def record_dir(path: str) -> epath.Path | None:
  """The run workdir holding the record for `path` (a workdir or one of its step
  directories `RUN/checkpoints/<step>`), or None (a params-only checkpoint)."""
  path = epath.Path(path)
  for candidate in (path, path.parent.parent):
    if (candidate / IDENTITY_FILE).exists():
      return candidate
  return None


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json and run.json (process 0)."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(config.to_json(indent=2, sort_keys=True) + "\n")
  (root / IDENTITY_FILE).write_text(json.dumps(identity(config), indent=2) + "\n")


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises RunMismatchError naming every contradiction with the run's record (if any)."""
  root = record_dir(workdir)
  if root is None:
    return
  saved = json.loads((root / IDENTITY_FILE).read_text())
  problems = differences(saved, identity(config))
  if problems:
    raise RunMismatchError(
        f"the config contradicts the run in {root} ({IDENTITY_FILE}):\n  "
        + "\n  ".join(problems)
        + "\nleave out --config to use the run's own config, or use another workdir")


def ensure(config: ml_collections.ConfigDict, workdir: str) -> None:
  """First start: write the record. Later starts: check the config against it."""
  if not (epath.Path(workdir) / IDENTITY_FILE).exists():
    save(config, workdir)
  else:
    check(config, workdir)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config.json as a ConfigDict."""
  root = record_dir(workdir) or epath.Path(workdir)
  path = root / CONFIG_FILE
  if not path.exists():
    raise RunMismatchError(f"{path} not found: {workdir} holds no run record; give "
                           "--config (a run records its config on its first start)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def planned_steps(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The run's length: config.total_steps, or with total_steps=0 (derived from the data
  at the first start) the length the run recorded then; None if not known yet."""
  if int(config.total_steps) > 0:
    return int(config.total_steps)
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  recorded = int(json.loads(path.read_text()).get("total_steps", 0))
  return recorded or None


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step in `workdir/checkpoints` (orbax's committed
  step directories are plain integers), without starting orbax."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit()]
  return max(steps) if steps else None


def has_config_flag(argv: list[str]) -> bool:
  return any(arg.lstrip("-") == "config" or arg.lstrip("-").startswith("config=")
             for arg in argv[1:])


def default_to_saved_config(argv: list[str]) -> list[str]:
  """`argv` with `--config=<saved_config.py>:WORKDIR` inserted when no --config is given
  and the --workdir has a run record (so --config.x=y overrides apply to it)."""
  if has_config_flag(argv):
    return argv
  workdir = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.lstrip("-").startswith("workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg.lstrip("-") == "workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  if not workdir or record_dir(workdir) is None:
    return argv
  loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")
  return [argv[0], f"--config={loader}:{workdir}"] + argv[1:]
