"""Sequence packing, measured: padding, rows per epoch, train-step throughput, FLOPs.

  python -m benchmarks.packing                          # the synthetic distribution below
  python -m benchmarks.packing --config configs/leo_mini_vicuna_7b.py:stage=3 \\
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \\
      --config.data.tokenizer=VICUNA_DIR               # a LLaVA-format JSON's real lengths

Three tables:
  1. the data: rows per epoch and the padding fraction (1 − real tokens / (rows ×
     max_length)) unpacked and packed, per look-ahead window (1 = plain next-fit) and
     image slots per row K; from the JSON's records as start-up validation measures them,
     or from the synthetic distribution;
  2. the train step (stage 3) at the benchmarks' 'tiny' and 'small' sizes (steps.SIZES)
     on this machine, unpacked rows vs packed rows of the synthetic distribution at that
     size's max_length, same number of rows, same parameters, timed alternately. Rows
     have static shapes, so a step's time does not depend on what its rows hold: real
     examples/s and supervised tokens/s are rows/s × the epoch's mean examples and
     supervised tokens per row (the timed batch's own counts are printed beside);
  3. at paper scale (--flops_config, abstract shapes, no weights): the train step's
     FLOPs per row, counted from its jaxpr with every scanned layer (XLA's cost_analysis
     counts a scan body once), divided by the real examples per row: unpacked 1, packed
     the plan's mean.

The synthetic length distribution (`synthetic_costs`): an example's cost (its text
tokens, plus N^V − 1 for an image when max_length counts visual tokens) is log-normal
with σ = 0.6 and mean max_length / 4, rounded and clipped to [8, max_length]; 90% of the
examples have an image (LLaVA-1.5's 665K mix: ~94%).
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from benchmarks import bench_utils
from benchmarks import steps as steps_bench
from leo_mini_jax import batch as batch_lib
from leo_mini_jax import config_files
from leo_mini_jax.data import encoder as encoder_lib
from leo_mini_jax.data import packing
from leo_mini_jax.data import pipeline
from leo_mini_jax.evaluation import flops as flops_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import step as step_lib

FLAGS = flags.FLAGS
SIGMA = 0.6
IMAGE_FRACTION = 0.9
MIN_COST = 8


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  config_flags.DEFINE_config_file("config", None, "A config whose data.train_json to "
                                  "measure (table 1); default: the synthetic distribution.",
                                  lock_config=False)
  flags.DEFINE_integer("max_length", 2048, "Synthetic distribution: data.max_length.")
  flags.DEFINE_integer("num", 50_000, "Synthetic distribution: examples per epoch.")
  flags.DEFINE_list("windows", ["1", "128"], "Look-ahead windows (rows open at once).")
  flags.DEFINE_list("max_images", ["4", "6", "8"], "Image slots per row (K).")
  flags.DEFINE_list("sizes", ["tiny", "small"], "Train-step sizes (steps.SIZES); '' = none.")
  flags.DEFINE_integer("throughput_max_images", 4, "K of the train-step table.")
  flags.DEFINE_bool("count_visual_tokens", False, "Train-step table: max_length counts "
                    "visual tokens, as the paper configs (the sizes' own setting: not).")
  flags.DEFINE_integer("rounds", 5, "Timed steps per variant (alternating).")
  flags.DEFINE_string("flops_config", "configs/leo_mini_llama3_8b.py",
                      "Paper-scale config of table 3 (stage 3); '' = skip.")
  flags.DEFINE_list("flops_max_images", ["4", "6", "8"], "K of table 3.")


def synthetic_costs(num: int, max_length: int, seed: int = 0,
                    image_fraction: float = IMAGE_FRACTION,
                    visual_extra: int = 0) -> packing.Costs:
  """`num` costs of the documented distribution (module docstring). An image example
  costs at least `visual_extra` (its N^V − 1 counted visual tokens) + MIN_COST."""
  rng = np.random.default_rng(seed)
  # A log-normal's mean is exp(μ + σ²/2): μ puts it at max_length / 4.
  mu = np.log(max_length / 4) - SIGMA ** 2 / 2
  tokens = np.clip(np.rint(rng.lognormal(mu, SIGMA, num)), MIN_COST, max_length)
  images = rng.random(num) < image_fraction
  tokens = np.where(images, np.maximum(tokens, visual_extra + MIN_COST), tokens)
  return packing.Costs(tokens.astype(np.int64), images)


def padding_rows(costs: packing.Costs, capacity: int, windows, max_images, seed=0):
  """Table 1's rows: (label, rows per epoch, padding fraction, examples per row)."""
  total = costs.tokens.sum()
  num = len(costs.tokens)
  out = [("unpacked", num, 1 - total / (num * capacity), 1.0)]
  order = packing.epoch_order(num, seed, 0)
  for k in max_images:
    for window in windows:
      rows = len(packing.plan_epoch(costs, order, capacity, int(k), int(window)))
      out.append((f"packed K={k} window={window}", rows, 1 - total / (rows * capacity),
                  num / rows))
  return out


def _example(cost, has_image, config, visual_extra, rng):
  """Encoder-style arrays of one example of `cost`: an image placeholder, instruction
  tokens in the first half of its text, supervised answer tokens in the second."""
  length, resolution = config.data.max_length, config.data.resolution
  n = int(cost) - (visual_extra if has_image else 0)
  ids = np.zeros((length,), np.int32)
  ids[:n] = rng.integers(1, min(200, config.model.llm.vocab_size), n)
  mask = lambda lo, hi: (np.arange(length) >= lo) & (np.arange(length) < hi)
  if has_image:
    ids[1] = batch_lib.IMAGE_PLACEHOLDER_ID
  image = (rng.integers(0, 256, (resolution, resolution, 3)) if has_image
           else np.zeros((resolution, resolution, 3))).astype(np.uint8)
  return {"input_ids": ids, "attention_mask": mask(0, n).astype(np.int32),
          "loss_mask": mask(n // 2, n).astype(np.int32),
          "instruction_mask": mask(2, n // 2).astype(np.int32),
          "image": image, "has_image": np.bool_(has_image)}


def step_batches(config, max_images: int, window: int = packing.DEFAULT_WINDOW, seed=0):
  """(unpacked batch, packed batch, {variant: (examples, supervised tokens) per row over
  the epoch}) for data.batch_size rows, from one synthetic epoch at the config's
  max_length: the first B examples, and B rows from the middle of its packed plan."""
  batch, length = int(config.data.batch_size), int(config.data.max_length)
  visual_extra = 0
  if config.data.get("max_length_counts_visual_tokens"):
    visual_extra = loop.build_model(config).config.num_visual_tokens - 1
  costs = synthetic_costs(max(64 * batch, 4096), length, seed, visual_extra=visual_extra)
  rng = np.random.default_rng(seed)
  order = packing.epoch_order(len(costs.tokens), seed, 0)
  rows = packing.plan_epoch(costs, order, length, max_images, window)
  example = lambda i: _example(costs.tokens[i], costs.images[i], config, visual_extra, rng)
  unpacked = encoder_lib.collate([example(i) for i in order[:batch]])
  middle = len(rows) // 2
  packed = encoder_lib.collate([
      packing.pack_examples([example(i) for i in row], length, max_images, 0,
                            visual_extra + 1) for row in rows[middle:middle + batch]])
  # _example supervises the second half of an example's text, as the step counts it.
  text = costs.tokens - np.where(costs.images, visual_extra, 0)
  supervised = float(np.sum(text - text // 2))
  num = len(costs.tokens)
  per_row = {"unpacked": (1.0, supervised / num),
             "packed": (num / len(rows), supervised / len(rows))}
  return unpacked, packed, per_row


def _counts(batch) -> tuple[int, int]:
  """(real examples, supervised tokens as the step counts them) of a batch."""
  examples = int(batch["segment_ids"].max(axis=1).sum()) if "segment_ids" in batch \
      else batch["input_ids"].shape[0]
  supervised = int((batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum())
  return examples, supervised


def throughput(size_name: str, max_images: int, rounds: int,
               count_visual_tokens: bool = False) -> list[dict]:
  """Table 2's rows for one size: unpacked and packed stage-3 steps, timed alternately."""
  size = steps_bench.SIZES[size_name]
  base = steps_bench.model_config(size, 3, size["batch"])
  base.data.max_length_counts_visual_tokens = count_visual_tokens
  packed_config = base.copy_and_resolve_references()
  packed_config.data.update(packing=True, max_images_per_row=max_images)
  unpacked_np, packed_np, per_row = step_batches(base, max_images)
  runs, counts = {}, {}
  for name, config, batch_np in (("unpacked", base, unpacked_np),
                                 ("packed", packed_config, packed_np)):
    setup = loop.TrainSetup(config)
    holder = {"state": setup.init_state(0)}
    batch = setup.global_batch(batch_np)
    train_step = setup.jit_train_step()

    def run(train_step=train_step, holder=holder, batch=batch):
      holder["state"], metrics = train_step(holder["state"], batch)
      return metrics["loss"]
    runs[name], counts[name] = run, _counts(batch_np)
  times = bench_utils.alternate(runs, rounds)
  out = []
  for name in runs:
    seconds = bench_utils.median(times[name])
    rows_per_s = size["batch"] / seconds
    out.append({"size": size_name, "variant": name, "step_ms": 1e3 * seconds,
                "batch_examples": counts[name][0],
                "examples_per_row": per_row[name][0],
                "examples_per_s": rows_per_s * per_row[name][0],
                "supervised_per_s": rows_per_s * per_row[name][1]})
  return out


def paper_flops(config_path: str, max_images: list[int]) -> list[dict]:
  """Table 3: the stage-3 train step's FLOPs per row and per real example, abstract."""
  module = config_files.load_config_module(config_path)
  rows = []
  variants = [("unpacked", None)] + [(f"packed K={k}", int(k)) for k in max_images]
  for name, k in variants:
    config = module.get_config("stage=3")
    config.data.batch_size = 1
    config.data.packing = k is not None
    if k is not None:
      config.data.max_images_per_row = k
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = loop.TrainSetup(config, mesh)
    step_fn = step_lib.make_train_step(setup.model, setup.tx, setup.trainable,
                                       setup.lr_schedule, 1)
    batch = batch_lib.abstract_batch(config, 1, setup.batch_sharding)
    start = time.perf_counter()
    with mesh_lib.activate(setup.mesh, setup.rules):
      step_flops = flops_lib.count_flops(step_fn, setup.abstract_state, batch).total_matmul
    per_row = 1.0
    if k is not None:
      length = int(config.data.max_length)
      extra = setup.model.config.num_visual_tokens - 1
      costs = synthetic_costs(FLAGS.num, length, visual_extra=extra)
      order = packing.epoch_order(len(costs.tokens), 0, 0)
      per_row = len(costs.tokens) / len(packing.plan_epoch(costs, order, length, k))
    rows.append({"variant": name, "tflop_per_row": step_flops / 1e12,
                 "examples_per_row": per_row,
                 "tflop_per_example": step_flops / per_row / 1e12,
                 "count_s": time.perf_counter() - start})
  return rows


def _data_costs(config) -> tuple[packing.Costs, int, str]:
  """Table 1's costs: the config's train JSON as validation measures it, else synthetic."""
  if config is None:
    return (synthetic_costs(FLAGS.num, FLAGS.max_length), FLAGS.max_length,
            f"synthetic: {FLAGS.num} examples, mean cost max_length/4, "
            f"{IMAGE_FRACTION:.0%} with an image")
  num_visual = loop.build_model(config).config.num_visual_tokens
  prepared = pipeline.prepare_source(config.data, split="train", process_index=0,
                                     process_count=1, num_visual_tokens=num_visual)
  costs = packing.example_costs(prepared)
  return (costs, int(config.data.max_length),
          f"{config.data.train_json}: {len(costs.tokens)} usable records, "
          f"{int(costs.images.sum())} with an image")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  costs, capacity, what = _data_costs(FLAGS.config)
  print(f"1. data ({what}), max_length {capacity}, mean cost "
        f"{costs.tokens.mean():.0f}")
  print(f"{'':<28}{'rows/epoch':>12}{'padding':>9}{'examples/row':>14}")
  for label, rows, padding, per_row in padding_rows(costs, capacity, FLAGS.windows,
                                                    FLAGS.max_images):
    print(f"{label:<28}{rows:>12,}{padding:>9.1%}{per_row:>14.2f}")
  sizes = [s for s in FLAGS.sizes if s]
  if sizes:
    print(f"\n2. stage-3 train step on {jax.device_count()} x {jax.devices()[0].device_kind}"
          f", K={FLAGS.throughput_max_images}, median of {FLAGS.rounds} alternating steps"
          f", max_length {'counts' if FLAGS.count_visual_tokens else 'excludes'} visual "
          "tokens")
    print(f"{'size':<7}{'variant':<10}{'step ms':>9}{'batch ex':>10}{'ex/row':>8}"
          f"{'examples/s':>12}{'supervised tok/s':>18}")
    for size in sizes:
      rows = throughput(size, FLAGS.throughput_max_images, FLAGS.rounds,
                        FLAGS.count_visual_tokens)
      for r in rows:
        print(f"{r['size']:<7}{r['variant']:<10}{r['step_ms']:>9.1f}"
              f"{r['batch_examples']:>10}{r['examples_per_row']:>8.2f}"
              f"{r['examples_per_s']:>12.1f}{r['supervised_per_s']:>18.0f}")
      gain = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
      print(f"{size}: packed / unpacked real examples/s = {gain:.2f}x")
  if FLAGS.flops_config:
    print(f"\n3. {FLAGS.flops_config}:stage=3 train step, abstract shapes, synthetic "
          f"distribution at its max_length")
    print(f"{'variant':<14}{'TFLOP/row':>11}{'examples/row':>14}{'TFLOP/example':>15}")
    for r in paper_flops(FLAGS.flops_config, FLAGS.flops_max_images):
      print(f"{r['variant']:<14}{r['tflop_per_row']:>11.1f}{r['examples_per_row']:>14.2f}"
            f"{r['tflop_per_example']:>15.1f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
