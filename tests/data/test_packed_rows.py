"""Sequence packing: the global row plan, packed rows against the unpacked encoding, and
the row position across process counts."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import packing as packing_benchmark
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID
from leo_mini_jax.data import packing
from leo_mini_jax.data import pipeline

R = 32


def _costs(num, capacity, seed=0, image_fraction=0.7):
  rng = np.random.default_rng(seed)
  return packing.Costs(rng.integers(1, capacity + 1, num),
                       rng.random(num) < image_fraction)


@pytest.mark.parametrize("window", [1, 8, 64])
def test_every_example_once_per_epoch_within_capacity_and_image_slots(window):
  costs = _costs(500, 100)
  order = packing.epoch_order(500, 3, 0)
  rows = packing.plan_epoch(costs, order, 100, 3, window)
  assert sorted(np.concatenate(rows).tolist()) == list(range(500))  # each exactly once
  for row in rows:
    assert len(row) >= 1 and costs.tokens[row].sum() <= 100
    assert costs.images[row].sum() <= 3
    if costs.images[row].sum() == 3:  # a row closes at its K-th image
      assert costs.images[row[-1]]
  if window == 1:  # next-fit keeps the order exactly
    np.testing.assert_array_equal(np.concatenate(rows), order)


def test_text_only_examples_pack_beside_image_examples():
  # Capacity 64, K=2: 0 opens row A, 1 joins it; 2 does not fit A and opens B, 3 joins B;
  # 4 goes to the oldest row it fits (A), whose second image closes it.
  costs = packing.Costs(np.array([30, 20, 30, 20, 10]), np.array([1, 0, 1, 0, 1], bool))
  rows = packing.plan_epoch(costs, np.arange(5), 64, 2, 4)
  assert [r.tolist() for r in rows] == [[0, 1, 4], [2, 3]]


def test_row_plan_is_deterministic_and_reshuffled_every_epoch():
  costs = _costs(300, 64, seed=1)
  spec = packing.PackingSpec(64, 4, 16, False, 1)
  plan, again = packing.RowPlan(costs, spec, seed=5), packing.RowPlan(costs, spec, seed=5)
  first = plan.epoch_rows(0)
  rows = [plan[g].tolist() for g in range(first + 3)]
  assert rows == [again[g].tolist() for g in range(first + 3)]
  # Epoch 0's rows hold each record once; then epoch 1 starts, in another order.
  assert sorted(sum(rows[:first], [])) == list(range(300))
  assert plan.locate(first) == (1, 0)
  epoch1 = sum((plan[first + g].tolist() for g in range(plan.epoch_rows(1))), [])
  assert sorted(epoch1) != sum(rows[:first], []) and sorted(epoch1) == list(range(300))
  assert epoch1 != sum(rows[:first], [])
  other = packing.RowPlan(costs, spec, seed=6)
  assert [other[g].tolist() for g in range(3)] != rows[:3]
  # A copy in a worker process (pickled) plans the same rows.
  import pickle  # pylint: disable=g-import-not-at-top
  copy = pickle.loads(pickle.dumps(plan))
  assert [copy[g].tolist() for g in range(first + 3)] == rows


def test_density_on_the_documented_synthetic_distribution():
  """The benchmark's distribution (mean cost max_length/4): a 128-row window packs
  > 95% of the row budget, plain next-fit far less, unpacked a quarter."""
  capacity = 2048
  costs = packing_benchmark.synthetic_costs(20_000, capacity, seed=0)
  assert abs(costs.tokens.mean() / capacity - 0.25) < 0.01
  order = packing.epoch_order(len(costs.tokens), 0, 0)
  density = {}
  for window in (1, 128):
    rows = packing.plan_epoch(costs, order, capacity, 8, window)
    density[window] = costs.tokens.sum() / (len(rows) * capacity)
  assert density[128] > 0.95
  assert density[1] < 0.9


def _config(**overrides):
  cfg = pipeline.default_data_config()
  cfg.update(resolution=R, max_length=256, system_prompt="", num_train=24, num_eval=4,
             batch_size=4, read_threads=1, prefetch_batches=2, packing=True,
             max_images_per_row=4, packing_window=8)
  cfg.update(**overrides)
  return cfg


def _check_rows_against_unpacked(batch, data, prepared, first_row):
  """Each row is the planned records' unpacked encodings laid end to end."""
  encoder = prepared.encoder
  for r in range(batch["input_ids"].shape[0]):
    segments = batch["segment_ids"][r]
    records = data.plan[first_row + r]
    n = len(records)
    used = segments > 0
    # Segment ids: 1..n in row order, each contiguous, then padding (0).
    changes = segments[used]
    np.testing.assert_array_equal(np.unique(changes), np.arange(1, n + 1))
    assert (np.diff(changes) >= 0).all() and not segments[used.sum():].any()
    np.testing.assert_array_equal(batch["attention_mask"][r], used)
    slot = 0
    for s, index in enumerate(records, 1):
      alone = encoder(prepared.source[int(index)])[0]
      k = int(alone["attention_mask"].sum())
      where = segments == s
      assert where.sum() == k
      for key in ("input_ids", "loss_mask", "instruction_mask"):
        np.testing.assert_array_equal(batch[key][r][where], alone[key][:k])
      if alone["has_image"]:
        # The k-th placeholder of the row is this example's and its image is slot k.
        placeholders = np.flatnonzero(batch["input_ids"][r] == IMAGE_PLACEHOLDER_ID)
        assert segments[placeholders[slot]] == s
        np.testing.assert_array_equal(batch["image"][r, slot], alone["image"])
        assert batch["has_image"][r, slot]
        slot += 1
    assert (batch["input_ids"][r] == IMAGE_PLACEHOLDER_ID).sum() == slot
    assert not batch["has_image"][r, slot:].any() and not batch["image"][r, slot:].any()


def test_packed_synthetic_batches_match_the_unpacked_encoding():
  cfg = _config()
  prepared = pipeline.prepare_source(cfg, split="train", process_index=0, process_count=1)
  data = pipeline.make_dataset(cfg, prepared=prepared)
  iterator = data.iterator()
  for step in range(2):
    batch = next(iterator)
    assert batch["segment_ids"].shape == (4, 256)
    assert batch["image"].shape == (4, 4, R, R, 3)
    assert batch["has_image"].shape == (4, 4)
    assert (batch["segment_ids"].max(1) > 1).all()  # several examples per row
    _check_rows_against_unpacked(batch, data, prepared, 4 * step)
  # Eval and generate are never packed.
  eval_batch, _ = next(iter(pipeline.make_dataset(cfg, split="eval", mode="eval",
                                                  process_index=0, process_count=1)))
  assert "segment_ids" not in eval_batch and eval_batch["image"].shape == (4, R, R, 3)


def _write_llava(tmp_path):
  """A LLaVA-1.5 mix-style JSON (llava_v1_5_mix665k.json's layout): image records with
  "<image>\\n" in the first human turn, multi-turn records, text-only records without an
  "image" key (the ShareGPT part), images of several sizes under the image folder."""
  rng = np.random.default_rng(0)
  (tmp_path / "coco").mkdir()
  records = []
  for i in range(14):
    turns = []
    for t in range(1 + i % 3):
      question = "What is in the picture? " * int(rng.integers(1, 4))
      if t == 0 and i % 4 != 3:
        question = "<image>\n" + question
      turns += [{"from": "human", "value": question},
                {"from": "gpt", "value": "A thing. " * int(rng.integers(1, 5))}]
    record = {"id": f"{i:012d}", "conversations": turns}
    if i % 4 != 3:
      size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
      Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
          tmp_path / "coco" / f"{i}.jpg")
      record["image"] = f"coco/{i}.jpg"
    records.append(record)
  path = tmp_path / "mix.json"
  path.write_text(json.dumps(records))
  return str(path)


@pytest.mark.parametrize("count_visual", [False, True])
def test_llava_costs_come_from_validation_and_fit_the_rows(tmp_path, count_visual):
  # Some records are longer than max_length: truncation cuts them to exactly its length.
  cfg = _config(kind="llava", train_json=_write_llava(tmp_path), max_length=256,
                max_images_per_row=3, max_length_counts_visual_tokens=count_visual,
                allow_truncation=True)
  prepared = pipeline.prepare_source(cfg, split="train", process_index=0, process_count=1,
                                     num_visual_tokens=9)
  costs = packing.example_costs(prepared)
  # The validation report's lengths are what tokenizing each record again gives.
  measured = packing.measure_costs(prepared.source, prepared.encoder)
  np.testing.assert_array_equal(costs.tokens, measured.tokens)
  np.testing.assert_array_equal(costs.images, measured.images)
  assert costs.images.sum() == 11 and (~costs.images).sum() == 3
  assert prepared.report.truncated and costs.tokens.max() == 256
  data = pipeline.make_dataset(cfg, prepared=prepared)
  batch = next(data.iterator())
  _check_rows_against_unpacked(batch, data, prepared, 0)
  extra = 8 if count_visual else 0  # the row budget counts N^V − 1 per image
  budget = batch["attention_mask"].sum(1) + extra * batch["has_image"].sum(1)
  assert (budget <= 256).all()
  planned = [costs.tokens[data.plan[r]].sum() for r in range(4)]
  np.testing.assert_array_equal(budget, planned)


def test_rows_consumed_are_the_same_global_rows_for_any_process_count():
  cfg = _config(batch_size=4)
  one = pipeline.make_dataset(cfg, process_index=0, process_count=1).iterator()
  single = [next(one) for _ in range(3)]  # rows 0..11
  rows = lambda batches: sorted(bytes(r) for b in batches for r in b["input_ids"])
  # Two processes, each 2 rows per step: after the same 3 steps, the same 12 rows.
  halves = [pipeline.make_dataset(cfg, process_index=p, process_count=2).iterator()
            for p in range(2)]
  both = [next(it) for _ in range(3) for it in halves]
  assert rows(both) == rows(single)
  # Resuming at row 4 (one step of 4 rows done) on 2 processes reads rows 4..11.
  resumed = [pipeline.make_dataset(cfg, process_index=p, process_count=2,
                                   start_position=4).iterator() for p in range(2)]
  assert rows([next(it) for _ in range(2) for it in resumed]) == rows(single[1:])


def test_a_cost_beyond_the_row_is_named():
  costs = packing.Costs(np.array([10, 70, 5]), np.zeros(3, bool))
  with pytest.raises(ValueError, match=r"record 1: cost 70 is not in \[1, 64\]"):
    packing.plan_epoch(costs, np.arange(3), 64, 2)
