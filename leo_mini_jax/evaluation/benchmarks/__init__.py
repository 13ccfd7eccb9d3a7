"""The paper's 13 benchmarks: one module each (files, prompt, answer rule, scorer).

`get(name)` returns a benchmark class; `ORDER` is the column order of the paper's tables.
"""

from leo_mini_jax.evaluation.benchmarks import (  # noqa: F401  (registers the modules)
    ai2d, chartqa, docvqa, gqa, mmbench, mme, mmmu, ocrbench, pope, scienceqa, seed,
    textvqa, vizwiz)
from leo_mini_jax.evaluation.benchmarks.base import (  # noqa: F401
    REGISTRY, Benchmark, BenchmarkError, ReadReport, Sample)

# Table 3's columns.
ORDER = ("mme", "mmbench", "seed", "gqa", "sqa", "mmmu", "pope", "ai2d", "vizwiz",
         "textvqa", "docvqa", "chartqa", "ocrbench")


def get(name: str) -> type:
  key = name.strip().lower()
  aliases = {b.title.lower(): n for n, b in REGISTRY.items()}
  aliases.update({"seed-bench": "seed", "scienceqa": "sqa", "mme^p": "mme"})
  key = aliases.get(key, key)
  if key not in REGISTRY:
    raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(ORDER)}")
  return REGISTRY[key]


def resolve(names: str, data_dir: str) -> list[tuple[type, str]]:
  """'mme,pope' or 'all' → [(benchmark class, its folder)] in the paper's order.

  A benchmark's folder is the first of its `folders` under data_dir; a single named
  benchmark may also be data_dir itself. 'all' takes every benchmark whose folder exists.
  """
  import os  # pylint: disable=g-import-not-at-top
  if not data_dir or not os.path.isdir(data_dir):
    raise BenchmarkError(f"eval.data_dir={data_dir!r} is not a directory")
  wanted = ORDER if names.strip().lower() == "all" else [get(n).name for n in names.split(",")
                                                         if n.strip()]
  out = []
  for name in sorted(dict.fromkeys(wanted), key=ORDER.index):
    cls = REGISTRY[name]
    folder = next((os.path.join(data_dir, f) for f in cls.folders
                   if os.path.isdir(os.path.join(data_dir, f))), None)
    if folder is None and names.strip().lower() != "all" and len(wanted) == 1:
      folder = data_dir
    if folder is None:
      if names.strip().lower() == "all":
        continue
      raise BenchmarkError(f"{cls.title}: no folder {' or '.join(cls.folders)} under "
                           f"{data_dir}")
    out.append((cls, folder))
  if not out:
    raise BenchmarkError(f"no benchmark folder found under {data_dir} "
                         f"(expected some of {[REGISTRY[n].folders[0] for n in ORDER]})")
  return out
