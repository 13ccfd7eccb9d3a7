"""MMoE-LLM routing: per-layer expert fractions, their files, and the paper's plots.

eval.py writes RUN/eval/NAME/routing.json ({'benchmark', 'counts', 'fraction'}: layers ×
experts) and routing.png for every benchmark, and RUN/eval/routing.png with one panel per
benchmark (Fig. 5 / 7 / 9). Comparing two runs (Fig. 8: vanilla router vs multimodal):

  python -m leo_mini_jax.evaluation.routing RUN_A RUN_B [--labels A,B] [--out FILE.png]

draws both runs' panels in two rows and prints, per run, how much the routing differs
between benchmarks (the mean over layers of the total-variation distance between the
benchmarks' expert distributions, averaged over benchmark pairs): the paper's claim is
that the multimodal router's is larger.
"""

import argparse
import glob
import itertools
import json
import os
from typing import Mapping, Sequence

import numpy as np


def fractions(counts: np.ndarray) -> np.ndarray:
  """[layers, E] token counts → per-layer fractions (rows sum to 1; empty rows 0)."""
  counts = np.asarray(counts, np.float64)
  totals = counts.sum(-1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def write_routing(out_dir: str, benchmark: str, counts: np.ndarray) -> dict:
  """routing.json and routing.png of one benchmark in `out_dir`."""
  counts = np.asarray(counts)
  record = {"benchmark": benchmark, "num_layers": int(counts.shape[0]),
            "num_experts": int(counts.shape[1]), "counts": counts.tolist(),
            "fraction": fractions(counts).tolist()}
  with open(os.path.join(out_dir, "routing.json"), "w") as f:
    json.dump(record, f, indent=2)
  plot_panels({benchmark: fractions(counts)}, os.path.join(out_dir, "routing.png"),
              f"{benchmark}: MMoE-LLM routing")
  return record


def load_run(run_dir: str) -> dict[str, np.ndarray]:
  """{benchmark title: fractions [layers, E]} from a run's RUN/eval/*/routing.json."""
  pattern = os.path.join(run_dir, "eval", "*", "routing.json")
  panels = {}
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      record = json.load(f)
    try:
      panels[record["benchmark"]] = np.asarray(record["fraction"], np.float64)
    except KeyError as e:
      raise ValueError(f"{path}: missing key {e}") from None
  if not panels:
    raise FileNotFoundError(f"no routing.json under {os.path.join(run_dir, 'eval')} "
                            "(run eval.py with eval.benchmark on an MMoE-LLM model)")
  return panels


def benchmark_spread(panels: Mapping[str, np.ndarray]) -> float:
  """Mean over benchmark pairs and layers of the total-variation distance between the
  pairs' per-layer expert distributions (0: every benchmark routes alike)."""
  pairs = list(itertools.combinations(panels.values(), 2))
  if not pairs:
    return 0.0
  return float(np.mean([0.5 * np.abs(a - b).sum(-1).mean() for a, b in pairs]))


def plot_panels(panels: Mapping[str, np.ndarray], path: str, title: str = "",
                rows: Sequence[tuple[str, Mapping[str, np.ndarray]]] | None = None) -> None:
  """Heatmaps (layers × experts, colour = fraction of tokens), one panel per benchmark;
  with `rows`, one row of panels per (label, panels)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = list(rows) if rows is not None else [("", panels)]
  names = list(dict.fromkeys(n for _, p in rows for n in p))
  layers = max(p[n].shape[0] for _, p in rows for n in p)
  fig, axes = plt.subplots(len(rows), len(names), squeeze=False,
                           figsize=(1.6 + 1.4 * len(names), 0.6 + (1.0 + 0.18 * layers)
                                    * len(rows)))
  image = None
  for r, (label, row_panels) in enumerate(rows):
    for c, name in enumerate(names):
      ax = axes[r][c]
      if name not in row_panels:
        ax.axis("off")
        continue
      data = row_panels[name]
      image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
      ax.set_title(f"{label}: {name}" if label else name, fontsize=8)
      ax.set_xticks(range(data.shape[1]), [f"E{e}" for e in range(data.shape[1])],
                    fontsize=7)
      ax.set_yticks(range(data.shape[0]), [str(l) for l in range(data.shape[0])], fontsize=6)
      if c == 0:
        ax.set_ylabel("layer", fontsize=8)
  if image is not None:
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="fraction of tokens")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare(run_a: str, run_b: str, out: str, labels: Sequence[str] = ("A", "B")) -> dict:
  """Fig. 8: the two runs' routing side by side; returns each run's benchmark spread."""
  a, b = load_run(run_a), load_run(run_b)
  plot_panels({}, out, "Expert choice per benchmark", rows=[(labels[0], a), (labels[1], b)])
  return {labels[0]: benchmark_spread(a), labels[1]: benchmark_spread(b)}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_a", help="workdir of the first run (e.g. the vanilla router)")
  parser.add_argument("run_b", help="workdir of the second run (e.g. the multimodal router)")
  parser.add_argument("--labels", default="vanilla MoE,MMoE-LLM",
                      help="comma-separated names of the two runs")
  parser.add_argument("--out", default="routing_comparison.png", help="output image")
  args = parser.parse_args(argv)
  labels = [s.strip() for s in args.labels.split(",")]
  if len(labels) != 2:
    parser.error("--labels needs two comma-separated names")
  try:
    spread = compare(args.run_a, args.run_b, args.out, labels)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {args.out}")
  for label, value in spread.items():
    print(f"  {label:<16} routing difference between benchmarks: {value:.3f}")


if __name__ == "__main__":
  main()
