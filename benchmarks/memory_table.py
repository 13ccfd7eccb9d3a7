"""The paper configs' per-device memory on the slices users rent, from the real compilers.

Compiles each row with `benchmarks.scale --fit` (one subprocess per row, its JSON lines in
`--out`), then writes the markdown table from those results into docs/scale.md:

  JAX_PLATFORMS=cpu aot/bin/python -m benchmarks.memory_table --out memory_rows \\
      [--rows 'llama3_8b-s3-*,*-h100x8'] [--docs docs/scale.md]
  python -m benchmarks.memory_table --out memory_rows --table_only [--docs docs/scale.md]

A row is `<model>-s<stage>-<slice>` (MODELS × stages 1-3 × SLICES). Rows whose file is
already in --out are not compiled again: delete the file to redo one. Each row searches
the smallest gradient accumulation that fits (from START where a guess saves compiles).
A GPU compile of the 8B step takes ~1 minute on 2 cores, a TPU one 5-15 minutes.
"""

import fnmatch
import glob
import json
import os
import re
import subprocess
import sys

from absl import app
from absl import flags

from configs import common
from leo_mini_jax.parallel import targets

FLAGS = flags.FLAGS
GIB = 2.0**30
DOCS_START = "<!-- memory_table: start -->"
DOCS_END = "<!-- memory_table: end -->"

# key: (name in the table, config file).
MODELS = {
    "llama3_8b": ("Llama-3-8B", "configs/leo_mini_llama3_8b.py"),
    "vicuna_7b": ("Vicuna-7B", "configs/leo_mini_vicuna_7b.py"),
}
# key: (devices, benchmarks.scale target flags). Slices by their vendor's name: a
# v5p-N slice has N TensorCores, N/2 chips (one jax device per chip).
SLICES = {
    "h100x8": (8, ["--gpu", "h100", "--topology", "1x1x8"]),
    "h100x64": (64, ["--gpu", "h100", "--topology", "1x8x8"]),
    "v5e-8": (8, ["--topology", "v5e:2x4"]),
    "v5e-64": (64, ["--topology", "v5e:8x8"]),
    "v5e-256": (256, ["--topology", "v5e:16x16"]),
    "v5p-8": (4, ["--topology", "v5p:2x2x1"]),
    "v5p-64": (32, ["--topology", "v5p:4x4x2"]),
    "v6e-64": (64, ["--topology", "v6e:8x8"]),
    "v6e-256": (256, ["--topology", "v6e:16x16"]),
}
# The order rows are compiled in: GPUs first (fast), then the TPU rows users ask most.
ORDER = ["*-h100x8", "*-h100x64", "llama3_8b-s3-v5e-8", "llama3_8b-s3-v5e-64",
         "llama3_8b-s2-v5e-64", "llama3_8b-s2-v5e-8", "llama3_8b-s2-v5p-8", "*-v6e-64",
         "*-v5e-256", "*-v6e-256", "*"]
# Accumulation guesses to walk from (--fit_start); others are binary-searched.
# The first matching pattern wins. v5p-8 guesses scale the 8×H100 results to 4 chips.
START = {"*-s3-h100x8": 1, "*-s2-h100x8": 1, "*-s1-h100x8": 1, "*-s3-v5e-8": 16,
         "*-s2-v5e-8": 16, "*-s1-v5e-8": 4, "vicuna_7b-s[12]-v5p-8": 4, "*-v5p-8": 2,
         "*-v5p-64": 1, "*-v5e-256": 1, "*-v6e-*": 1}


def define_flags():
  flags.DEFINE_string("out", None, "Folder of the rows' JSON lines (<row>.jsonl).")
  flags.DEFINE_list("rows", ["*"], "Row patterns (fnmatch) to compile.")
  flags.DEFINE_bool("table_only", False, "Compile nothing; write the table.")
  flags.DEFINE_string("docs", "", f"Write the table between {DOCS_START!r} and "
                      f"{DOCS_END!r} in this file (else print it).")
  flags.mark_flags_as_required(["out"])


def row_keys() -> list[str]:
  return [f"{model}-s{stage}-{slice_}" for model in MODELS for stage in (1, 2, 3)
          for slice_ in SLICES]


def parse_key(key: str) -> tuple[str, int, str]:
  model, stage, slice_ = key.split("-", 2)
  return model, int(stage[1:]), slice_


def ordered(patterns: list[str]) -> list[str]:
  """The rows matching `patterns`, in ORDER's priority."""
  chosen = [k for k in row_keys() if any(fnmatch.fnmatch(k, p) for p in patterns)]
  rank = lambda k: next(i for i, p in enumerate(ORDER) if fnmatch.fnmatch(k, p))
  return sorted(chosen, key=lambda k: (rank(k), row_keys().index(k)))


def mesh_flag(devices: int, batch: int) -> str:
  """FSDP over every device; where the batch has fewer rows than devices, the rest of
  each weight's split goes to 'tensor' (one row per data-parallel device)."""
  if devices <= batch:
    return "fsdp=-1"
  return f"fsdp={batch},tensor={devices // batch}"


def scale_command(key: str, json_path: str) -> list[str]:
  model, stage, slice_ = parse_key(key)
  devices, target_flags = SLICES[slice_]
  command = [sys.executable, "-m", "benchmarks.scale",
             f"--config={MODELS[model][1]}:stage={stage}", *target_flags,
             f"--mesh={mesh_flag(devices, common.FULL_SIZE_BATCH_SIZES[stage])}",
             "--fit", f"--json={json_path}"]
  start = next((v for p, v in START.items() if fnmatch.fnmatch(key, p)), None)
  if start:
    command.append(f"--fit_start={start}")
  return command


def compile_rows(keys: list[str], out: str) -> None:
  os.makedirs(out, exist_ok=True)
  for key in keys:
    path = os.path.join(out, key + ".jsonl")
    if os.path.exists(path):
      continue
    partial = path + ".partial"
    if os.path.exists(partial):
      os.remove(partial)
    command = scale_command(key, partial)
    print(f"[{key}] {' '.join(command[1:])}", flush=True)
    with open(os.path.join(out, key + ".log"), "w") as log:
      code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code == 0 and os.path.exists(partial):
      os.replace(partial, path)
    else:
      print(f"[{key}] failed (exit {code}): see {key}.log", flush=True)


# ------------------------------------------------------------------------------ table

def accumulation_choices(row: dict) -> list[int]:
  """What aot.accumulation_choices gives for the row's batch and mesh."""
  batch = row["batch_size"]
  parallel = row["mesh"].get("data", 1) * row["mesh"].get("fsdp", 1)
  return [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % parallel == 0]


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}
# libtpu's two over-budget messages: what the temporaries needed, or all of HBM used.
_NEEDED = {"temp": r"temporaries \(([\d.]+)([KMG])\)",
           "total": r"[Uu]sed ([\d.]+)([KMG]) of [\d.]+[KMG] hbm"}


def needed_bytes(row: dict) -> tuple[str, float] | None:
  """(column, bytes) a TPU program over budget needed, from the compiler's error:
  'the total memory required for HLO temporaries (22.83G) exceeds available HBM', or
  'Used 15.79G of 15.75G hbm'."""
  for column, pattern in _NEEDED.items():
    match = re.search(pattern, row.get("error", ""))
    if match:
      return column, float(match.group(1)) * _UNITS[match.group(2)]
  return None


def summarise(rows: list[dict]) -> dict:
  """One table line from a row's tries: the smallest accumulation that fits."""
  choices = accumulation_choices(rows[0])
  tried = {r["grad_accum_steps"]: r for r in rows}
  fitting = sorted(a for a, r in tried.items() if r["fits"])
  if fitting:
    best = tried[fitting[0]]
    below = [a for a in choices if a < fitting[0]]
    proven = not below or (below[-1] in tried and not tried[below[-1]]["fits"])
    return dict(best, verdict="fits" if proven else "fits (smaller accum not tried)")
  largest = max(tried)
  verdict = ("does not fit at any accum" if largest == choices[-1]
             else f"does not fit up to accum {largest}")
  return dict(tried[largest], verdict=verdict)


def stage_label(stage: int, row: dict) -> str:
  """'3', '3 (packed, 4 images)' where rows hold several examples, '…, 4 expert passes'
  where the experts take the images in passes (model.vision_passes)."""
  notes = []
  if row.get("images_per_row", 1) > 1:
    notes.append(f"packed, {row['images_per_row']} images")
  if row.get("vision_passes", 1) > 1:
    notes.append(f"{row['vision_passes']} expert passes")
  return f"{stage} ({', '.join(notes)})" if notes else str(stage)


def slice_label(slice_: str, devices: int) -> str:
  """'8×H100', 'v5e-8', 'v5p-8 (4 chips)'."""
  if slice_.startswith("h100x"):
    return f"{slice_[5:]}×H100"
  return slice_ if slice_.endswith(f"-{devices}") else f"{slice_} ({devices} chips)"


def gib(value) -> str:
  return "–" if value is None else f"{value / GIB:.1f}"


def mesh_text(mesh: dict) -> str:
  return " × ".join(f"{axis} {size}" for axis, size in mesh.items() if size > 1) or "1"


def installed() -> list[str]:
  """'jax 0.10.2', 'libtpu 0.0.42.1', ...: the compilers installed here."""
  versions = {p: targets.package_version(p) for p in ("jax", "libtpu", "jax-cuda12-plugin")}
  return [f"{p} {v}" for p, v in versions.items() if v != "unknown"]


def verdict_text(line: dict, compilers: list[str]) -> str:
  """The verdict, naming the compiler where it is not the installed one (TPU_LIBRARY_PATH)."""
  compiler = line.get("compiler")
  if compiler and compiler not in compilers:
    return f"{line['verdict']} ({compiler})"
  return line["verdict"]


def table(out: str) -> str:
  lines = [
      "| model | stage | slice | mesh | accum | params | optimizer | temp | peak | total "
      "| memory | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  missing = []
  compilers = installed()
  for key in row_keys():
    path = os.path.join(out, key + ".jsonl")
    if not os.path.exists(path):
      missing.append(key)
      continue
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    model, stage, slice_ = parse_key(key)
    line = summarise(rows)
    text = {name: gib(line.get(name)) for name in ("temp", "total")}
    needed = needed_bytes(line) if line.get("total") is None else None
    if needed:
      text[needed[0]] = f"{gib(needed[1])} needed"
    lines.append(
        f"| {MODELS[model][0]} | {stage_label(stage, line)} | "
        f"{slice_label(slice_, line['devices'])} | "
        f"{mesh_text(line['mesh'])} | {line['grad_accum_steps']} | {gib(line['params'])} | "
        f"{gib(line['optimizer'])} | {text['temp']} | {gib(line.get('peak'))} | "
        f"{text['total']} | {gib(line['memory'])} | {verdict_text(line, compilers)} |")
  lines.append("")
  lines.append(f"Per device, GiB; {', '.join(compilers)} (a verdict names the compiler "
               f"where another was used). Not compiled: {not_compiled(missing)}.")
  return "\n".join(lines) + "\n"


def not_compiled(missing: list[str]) -> str:
  """'v5p-64 (all), v6e-256 (Vicuna-7B s1, s2)': the missing rows by slice."""
  parts = []
  for slice_ in SLICES:
    keys = [k for k in missing if parse_key(k)[2] == slice_]
    if len(keys) == len(MODELS) * 3:
      parts.append(f"{slice_} (all)")
    elif keys:
      names = [f"{MODELS[parse_key(k)[0]][0]} s{parse_key(k)[1]}" for k in keys]
      parts.append(f"{slice_} ({', '.join(names)})")
  return ", ".join(parts) or "none"


def write_docs(path: str, text: str) -> None:
  with open(path) as f:
    doc = f.read()
  if DOCS_START not in doc or DOCS_END not in doc:
    raise ValueError(f"{path}: no {DOCS_START} ... {DOCS_END} markers to write between")
  head, rest = doc.split(DOCS_START, 1)
  tail = rest.split(DOCS_END, 1)[1]
  with open(path, "w") as f:
    f.write(head + DOCS_START + "\n" + text + DOCS_END + tail)


def main(argv):
  del argv
  if not FLAGS.table_only:
    compile_rows(ordered(FLAGS.rows), FLAGS.out)
  text = table(FLAGS.out)
  if FLAGS.docs:
    write_docs(FLAGS.docs, text)
  else:
    print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
