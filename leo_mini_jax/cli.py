"""What every command line (train.py, eval.py, demo.py, ask, convert) shares.

A known failure — a bad config field, bad data, a missing file, a checkpoint that does
not fit — is the user's to fix, not a bug: it is printed as `PROG: message` (a few lines
at most, naming the field or file) and the program exits 1. `--verbose` / `-v` prints
the traceback as well. Anything else is a bug and keeps its traceback.

`run(main)` replaces `absl.app.run(main)`. Config overrides are checked while the flags
are parsed, so `--config.optimizer.lrr=1` says which fields exist and which one was
probably meant (difflib), in one line.
"""

import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable

from absl import app
from absl import flags

from leo_mini_jax.errors import UserError

VERBOSE_FLAGS = ("--verbose", "-v")


# ValueError / OSError: what config validation, data readers, tokenizers and checkpoint
# loading raise with a message naming the field or file.
KNOWN_ERRORS = (UserError, ValueError, OSError)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _message(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  lines = text.splitlines()
  if len(lines) > 8:  # a long list (missing keys...): the head says what is wrong
    lines = lines[:8] + [f"... ({len(lines) - 8} more lines; --verbose for all)"]
  return "\n".join(lines)


def _override_error(error: BaseException, argv: list[str]) -> str | None:
  """'--config.a.b: no such config field (did you mean 'a.c'?)' for an unknown override.

  ml_collections' error (KeyError / AttributeError, possibly wrapped in a flags error)
  names the missing key; the message names the flag as the user typed it and the
  closest field beside it.
  """
  text = str(error)
  match = re.search(r'instead of \\?"([^"\\]+)', text) or re.search(
      r"^\W*([A-Za-z_][\w]*)", text)
  if not match:
    return None
  bad = match.group(1)
  for arg in argv[1:]:
    if not arg.lstrip("-").startswith("config."):
      continue
    path = arg.lstrip("-").split("=", 1)[0].split(".", 1)[1]
    parts = path.split(".")
    if bad not in parts:
      continue
    parent = ".".join(parts[:parts.index(bad)])
    try:
      suggestion = did_you_mean(bad, list(_config_at(argv, parent).keys()))
    except Exception:  # pylint: disable=broad-except
      suggestion = ""
    if suggestion and parent:
      suggestion = suggestion.replace("mean '", f"mean '{parent}.")
    return f"--config.{path}: no such config field{suggestion}"
  return None


def _config_at(argv: list[str], parent: str) -> Any:
  """The ConfigDict node at `parent` of the config file given on the command line."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.lstrip("-").startswith("config="):
      spec = arg.split("=", 1)[1]
    elif arg.lstrip("-") == "config" and i + 1 < len(argv):
      spec = argv[i + 1]
  path, _, arg = spec.partition(":")
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  node = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(
      f"{path}:{arg}" if arg else path)
  for part in [p for p in parent.split(".") if p]:
    node = node[part]
  return node


def _flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
      message = _override_error(e, argv) or _message(e).splitlines()[-1]
      print(f"{prog}: {message}", file=sys.stderr)
      sys.exit(2)
  return parse


def run(main: Callable[[list[str]], Any], prog: str | None = None,
        saved_config: bool = False) -> None:
  """`absl.app.run(main)` that prints known errors as `prog: message` and exits 1.

  `saved_config`: without --config, a --workdir that holds a run record supplies its
  own saved config (see `run_record`).
  """
  prog = prog or os.path.basename(sys.argv[0])
  verbose = any(arg in VERBOSE_FLAGS for arg in sys.argv[1:])
  sys.argv = [arg for arg in sys.argv if arg not in VERBOSE_FLAGS]
  if saved_config:
    from leo_mini_jax import run_record  # pylint: disable=g-import-not-at-top
    sys.argv = run_record.default_to_saved_config(sys.argv)

  def guarded(argv):
    try:
      return main(argv)
    except KNOWN_ERRORS as e:
      if verbose:
        traceback.print_exc()
      print(f"{prog}: {_message(e)}", file=sys.stderr)
      if not verbose:
        print("(--verbose shows the traceback)", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=_flags_parser(prog))
