"""The embedded default: the tiny LEO-MINI through stages 1 → 2 → 3 on synthetic VQA, then eval.

  python demo.py [--workdir /tmp/leo_mini_demo] [--tokens 4]

--workdir must be new, empty, or a folder the demo made before (it holds a .leo_mini_demo
marker); only its stage1..3 runs are replaced, nothing else in it is deleted.

Stage 1 trains the projector (LLM and experts frozen), stage 2 everything, stage 3 adds
CoTR and MMoE-LLM on top of stage 2 with the LLM and experts frozen (paper Table 6). For
stages 2 and 3 it prints the number of visual tokens, the prefill FLOPs and the held-out
accuracy per question type next to the blind baseline.
"""

import os
import shutil
import time

from absl import flags
from absl import logging

from configs import tiny
from leo_mini_jax import cli
from leo_mini_jax.evaluation import runner
from leo_mini_jax.training import loop

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/leo_mini_demo", "Root of the three runs.")
_TOKENS = flags.DEFINE_integer("tokens", 4, "N^V, visual tokens after CoTR in stage 3.")
_RESUME = flags.DEFINE_bool("resume", False, "Keep existing runs instead of starting over.")


MARKER = ".leo_mini_demo"  # written into --workdir: the folder is the demo's own
STAGE_DIRS = ("stage1", "stage2", "stage3")


def prepare_root(root: str, resume: bool) -> None:
  """Makes `root` the demo's folder, deleting nothing the demo did not create.

  A missing or empty folder gets the marker file. A folder with the marker is the
  demo's: its stage1..3 runs are removed (unless `resume`); anything else in it stays.
  A non-empty folder without the marker is refused.
  """
  if os.path.isdir(root) and os.listdir(root) and not os.path.exists(
      os.path.join(root, MARKER)):
    raise cli.UserError(
        f"--workdir {root} is not empty and is not a demo folder (no {MARKER} file): "
        "the demo writes only into a new or empty folder, or one it made before; "
        "choose another --workdir")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, MARKER), "w") as f:
    f.write("made by demo.py: its stage1..3 runs live here and are replaced on re-run\n")
  if not resume:
    for name in STAGE_DIRS:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = _WORKDIR.value
  prepare_root(root, resume=_RESUME.value)
  start = time.perf_counter()
  results, previous = {}, ""
  for stage in (1, 2, 3):
    config = tiny.get_config(f"stage={stage},tokens={_TOKENS.value}")
    config.init_from = previous
    workdir = os.path.join(root, f"stage{stage}")
    stage_start = time.perf_counter()
    summary = loop.train(config, workdir)
    final = summary["final"]
    print(f"stage {stage}: {config.total_steps} steps in {time.perf_counter() - stage_start:.0f} s, "
          f"final loss {final['loss']:.3f}, token accuracy {final['token_accuracy']:.3f}")
    if stage >= 2:
      eval_start = time.perf_counter()
      results[stage] = runner.evaluate(config, workdir, params=summary["state"].params,
                                       setup=summary["setup"])
      print(f"stage {stage} evaluation: {time.perf_counter() - eval_start:.0f} s")
    previous = workdir
  print()
  print(f"{'':<10}{'visual tokens':>14}{'prefill MFLOPs':>16}{'accuracy':>10}"
        f"{'color':>8}{'shape':>8}")
  for stage, result in results.items():
    acc = result["accuracy"]
    print(f"stage {stage:<4}{result['num_visual_tokens']:>14}"
          f"{result['prefill_flops'] / 1e6:>16.1f}{acc['overall']:>10.1%}"
          f"{acc.get('color', 0):>8.1%}{acc.get('shape', 0):>8.1%}")
  print(f"total time {time.perf_counter() - start:.0f} s; runs under {root}")


if __name__ == "__main__":
  cli.run(main)
