"""The package's import graph: no cycle, and nothing outside training imports the trainer.

Every import counts, including those inside functions (they hide a cycle, not remove it).
"""

import ast
import os

import leo_mini_jax

ROOT = os.path.dirname(leo_mini_jax.__file__)
TRAINER = "leo_mini_jax.training.loop"
# Packages and modules that run a trained model (or check a config) without training it.
NOT_TRAINING = ("leo_mini_jax.evaluation", "leo_mini_jax.porting",
                "leo_mini_jax.config_validation", "leo_mini_jax.runtime",
                "leo_mini_jax.models", "leo_mini_jax.batch", "leo_mini_jax.data")


def import_graph() -> dict[str, set[str]]:
  """{module: leo_mini_jax modules it imports}, from the source (ast), all imports."""
  modules = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
        modules[dotted.removesuffix(".__init__")] = path
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for a in node.names:  # `from pkg import module` names a module; else the package
          full = f"{node.module}.{a.name}"
          targets.add(full if full in modules else node.module)
    graph[module] = {t for t in targets if t in modules and t != module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each strongly connected component with more than one module
  (package __init__ edges to their own submodules excepted)."""
  edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
  found, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for target in sorted(edges[node]):
      if state.get(target) == "open":
        found.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack)
    stack.pop()
    state[node] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module, [])
  return found


def test_no_import_cycle():
  assert cycles(import_graph()) == []


def test_only_training_imports_the_trainer():
  importers = sorted(m for m, ts in import_graph().items() if TRAINER in ts)
  assert not [m for m in importers if m.startswith(NOT_TRAINING)], importers


def test_nothing_that_runs_a_model_imports_training():
  """Evaluation, porting, config checks, the runtime, models, the batch contract and data
  import nothing under training/ (not only the loop): what they share with training
  (reading checkpoints, the stage table, TensorBoard scalars) lives outside it."""
  arrows = sorted(f"{m} -> {t}" for m, ts in import_graph().items()
                  if m.startswith(NOT_TRAINING)
                  for t in ts if t.startswith("leo_mini_jax.training"))
  assert arrows == []


# Modules stay under ~400 lines (STYLE.md): past that a module holds more than one idea.
MAX_MODULE_LINES = 400
# Over the limit: the LLaMA decoder (config, attention, MLP, block, prefill and decode
# with the cache) is one idea at ~430 lines; its rotary embeddings live in rotary.py.
LONG_MODULES = {"leo_mini_jax/models/llama.py"}


def test_modules_stay_small():
  long = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        with open(path) as f:
          lines = sum(1 for _ in f)
        relative = os.path.relpath(path, os.path.dirname(ROOT)).replace(os.sep, "/")
        if lines > MAX_MODULE_LINES and relative not in LONG_MODULES:
          long[relative] = lines
  assert long == {}


if __name__ == "__main__":
  graph = import_graph()
  print("modules:", len(graph), "edges:", sum(map(len, graph.values())))
  print("cycles:", cycles(graph) or "none")
  for source in ("leo_mini_jax.evaluation", "leo_mini_jax.porting",
                 "leo_mini_jax.config_validation", "leo_mini_jax.runtime"):
    edges = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(source)
                   for t in ts if t.startswith("leo_mini_jax.training"))
    print(f"{source} -> training/:", edges or "none")
