"""The paper's 13 benchmarks (+ MMBench-CN): one module each (files, prompt, answer rule,
answer length, scorer).

The registry is the one list of benchmarks: `names()` is every registered one in the
paper's column order (each class's `column`) followed by those outside the paper's
tables, in registration order; `ORDER` is the paper's columns (Table 3). `get(name)`
returns a benchmark class.
"""

import os

from leo_mini_jax.evaluation.benchmarks import (  # noqa: F401  (registers the modules)
    ai2d, chartqa, docvqa, gqa, mmbench, mme, mmmu, ocrbench, pope, scienceqa, seed,
    textvqa, vizwiz)
from leo_mini_jax.evaluation.benchmarks.base import (  # noqa: F401
    REGISTRY, Benchmark, BenchmarkError, MissingFile, ReadReport, Sample)


def names() -> tuple[str, ...]:
  """Every registered benchmark: the paper's columns first, then the others."""
  position = {name: i for i, name in enumerate(REGISTRY)}
  key = lambda n: (REGISTRY[n].column is None, REGISTRY[n].column or 0, position[n])
  return tuple(sorted(REGISTRY, key=key))


# Table 3's columns.
ORDER = tuple(n for n in names() if REGISTRY[n].column is not None)


def get(name: str) -> type:
  key = name.strip().lower()
  aliases = {b.title.lower(): n for n, b in REGISTRY.items()}
  aliases.update({"seed-bench": "seed", "scienceqa": "sqa", "mme^p": "mme",
                  "mmbench_en": "mmbench"})
  key = aliases.get(key, key)
  if key not in REGISTRY:
    raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
  return REGISTRY[key]


def resolve(spec: str, data_dir: str) -> list[tuple[type, str]]:
  """'mme,pope' or 'all' → [(benchmark class, its folder)] in `names()` order.

  A benchmark's folder is the first of its `folders` under data_dir that exists; a single
  named benchmark may also be data_dir itself. 'all' takes every registered benchmark
  whose folder exists (and `detect`s its files).
  """
  if not data_dir or not os.path.isdir(data_dir):
    raise BenchmarkError(f"eval.data_dir={data_dir!r} is not a directory")
  every = spec.strip().lower() == "all"
  wanted = names() if every else [get(n).name for n in spec.split(",") if n.strip()]
  order = names()
  out = []
  for name in sorted(dict.fromkeys(wanted), key=order.index):
    cls = REGISTRY[name]
    folder = next((os.path.join(data_dir, f) for f in cls.folders
                   if os.path.isdir(os.path.join(data_dir, f))
                   and (not every or cls.detect(os.path.join(data_dir, f)))), None)
    if folder is None and not every and len(wanted) == 1:
      folder = data_dir
    if folder is None:
      if every:
        continue
      raise BenchmarkError(f"{cls.title}: no folder {' or '.join(cls.folders)} under "
                           f"{data_dir}")
    out.append((cls, folder))
  if not out:
    raise BenchmarkError(f"no benchmark folder found under {data_dir} "
                         f"(expected some of {[REGISTRY[n].folders[0] for n in order]})")
  return out
