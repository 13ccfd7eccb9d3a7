"""Golden record of the paper models' shardings: every parameter's PartitionSpec on
8-, 64- and 256-device meshes, and every activation constraint, per config and stage.

A change to the rules, a logical axis name or a parameter shows up as a reviewable diff
of tests/parallel/golden/*.txt. After an intended change, regenerate and review:

  python -m tests.parallel.sharding_golden --update
  git diff tests/parallel/golden/

Without --update it compares and prints the differences. Nothing is allocated: the
parameter tree comes from `jax.eval_shape` of the model's init and the meshes are
`AbstractMesh`es, so no devices are needed.
"""

import argparse
import difflib
import os
import sys
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh

from configs import leo_mini_llama3_8b
from configs import leo_mini_vicuna_7b
from leo_mini_jax.models import factory
from leo_mini_jax.parallel import mesh as mesh_lib

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
REGENERATE = "python -m tests.parallel.sharding_golden --update"
CONFIGS = {"llama3_8b": leo_mini_llama3_8b, "vicuna_7b": leo_mini_vicuna_7b}
STAGES = (2, 3)
# The paper configs' meshes (FSDP over every device) and docs/scale.md's 256-chip variant.
MESHES = {8: dict(data=1, fsdp=8, tensor=1), 64: dict(data=1, fsdp=64, tensor=1),
          256: dict(data=1, fsdp=128, tensor=2)}


def golden_path(variant: str, stage: int) -> str:
  return os.path.join(GOLDEN_DIR, f"{variant}_stage{stage}.txt")


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in mesh_lib.MESH_AXES), mesh_lib.MESH_AXES)


def trace_model(config) -> tuple[Any, list[tuple[str, tuple]]]:
  """(boxed abstract params, [(module path, logical names)] of every activation constraint
  the forward pass makes), from one `factory.abstract_params` (an eval_shape of the model's init)."""
  constraints = []
  original = nn.with_logical_constraint

  def recording(x, names, *args, **kwargs):
    module = nn.module._context.module_stack[-1]  # pylint: disable=protected-access
    constraints.append(("/".join(module.path) if module is not None else "", tuple(names)))
    return original(x, names, *args, **kwargs)

  nn.with_logical_constraint = recording
  try:
    boxed = factory.abstract_params(config)
  finally:
    nn.with_logical_constraint = original
  return boxed, constraints


def _entry(entry) -> str:
  if entry is None:
    return "_"
  return entry if isinstance(entry, str) else "+".join(entry)


def _spec_text(spec, ndim: int) -> str:
  entries = list(spec) + [None] * (ndim - len(spec))
  return "[" + ",".join(map(_entry, entries)) + "]"


def render(variant: str, stage: int, boxed, constraints, rules) -> str:
  """The golden text: a header, one line per parameter, one per distinct activation."""
  meshes = {n: abstract_mesh(sizes) for n, sizes in MESHES.items()}
  lines = [f"# {variant} stage {stage}: PartitionSpecs under mesh.DEFAULT_RULES.",
           f"# Regenerate after an intended change: {REGENERATE}",
           "# meshes: " + "; ".join(f"{n} = " + " x ".join(f"{a} {s}" for a, s in sizes.items())
                                    for n, sizes in MESHES.items()),
           "# parameter  shape  logical names  spec per mesh ('_' = whole, 'a+b' = both axes)"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  named = sorted((jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
                 for path, leaf in leaves)
  for where, leaf in named:
    shape, names = tuple(leaf.value.shape), tuple(leaf.names)
    specs = "  ".join(
        f"{n}:" + _spec_text(mesh_lib.spec_for(shape, names, mesh, rules, where), len(shape))
        for n, mesh in meshes.items())
    lines.append(f"{where}  {list(shape)}  {_spec_text(names, len(names))}  {specs}")
  lines.append("# activation constraints: module  logical names  spec (flax's resolution, "
               "any mesh)")
  for where, names in sorted(set(constraints), key=lambda c: (c[0], str(c[1]))):
    spec = nn.logical_to_mesh_axes(names, rules)
    lines.append(f"{where}  {_spec_text(names, len(names))}  {_spec_text(spec, len(names))}")
  return "\n".join(lines) + "\n"


def current(variant: str, stage: int) -> tuple[str, list[tuple[str, tuple]]]:
  """(golden text as the code now produces it, the recorded activation constraints)."""
  config = CONFIGS[variant].get_config(f"stage={stage}")
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
  if rules != mesh_lib.DEFAULT_RULES:
    raise ValueError(f"{variant} stage {stage}: config.sharding_rules differ from "
                     "mesh.DEFAULT_RULES; the golden files record the defaults")
  boxed, constraints = trace_model(config)
  return render(variant, stage, boxed, constraints, rules), constraints


def difference(variant: str, stage: int, text: str, max_lines: int = 80) -> str:
  """'' when `text` matches the checked-in file, else a unified diff and what to do."""
  path = os.path.relpath(golden_path(variant, stage))
  if not os.path.exists(path):
    return f"{path} is missing; create it with: {REGENERATE}"
  with open(path) as f:
    expected = f.read()
  if expected == text:
    return ""
  diff = list(difflib.unified_diff(expected.splitlines(), text.splitlines(),
                                   f"{path} (checked in)", "now", lineterm="", n=0))
  shown = diff[:max_lines] + ([f"... {len(diff) - max_lines} more lines"]
                              if len(diff) > max_lines else [])
  return (f"{variant} stage {stage}: the shardings differ from {path}.\n" + "\n".join(shown)
          + f"\nIf the change is intended, run `{REGENERATE}` and review `git diff "
          "tests/parallel/golden/`.")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--update", action="store_true", help="rewrite the golden files")
  args = parser.parse_args(argv)
  failed = False
  for variant in CONFIGS:
    for stage in STAGES:
      text, _ = current(variant, stage)
      if args.update:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(golden_path(variant, stage), "w") as f:
          f.write(text)
        print(f"wrote {golden_path(variant, stage)} ({text.count(chr(10))} lines)")
      else:
        message = difference(variant, stage, text)
        failed |= bool(message)
        print(message or f"{variant} stage {stage}: matches")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
