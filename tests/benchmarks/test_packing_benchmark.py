"""benchmarks.packing times the rows it claims: packed rows of its documented distribution
in the batch contract, and per-row counts that match the rows it builds."""

import numpy as np
import pytest

from benchmarks import packing as packing_benchmark
from benchmarks import steps
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID


@pytest.mark.parametrize("count_visual", [False, True])
def test_step_batches_are_packed_rows_of_the_distribution(count_visual):
  size = steps.SIZES["tiny"]
  config = steps.model_config(size, 3, size["batch"])
  config.data.max_length_counts_visual_tokens = count_visual
  unpacked, packed, per_row = packing_benchmark.step_batches(config, max_images=4)
  assert "segment_ids" not in unpacked and unpacked["input_ids"].shape == (32, 64)
  assert packed["segment_ids"].shape == (32, 64) and packed["image"].shape[:2] == (32, 4)
  images = packed["has_image"].sum(1)
  np.testing.assert_array_equal((packed["input_ids"] == IMAGE_PLACEHOLDER_ID).sum(1), images)
  extra = 3 if count_visual else 0  # N^V − 1 = 3 in the tiny stage 3
  assert (packed["attention_mask"].sum(1) + extra * images <= 64).all()
  np.testing.assert_array_equal(packed["attention_mask"], packed["segment_ids"] > 0)
  # The epoch's mean examples per row is the plan's, and the timed rows are like it.
  assert per_row["unpacked"][0] == 1 and 3 < per_row["packed"][0] <= 4
  examples = packed["segment_ids"].max(1).sum()
  assert abs(examples / 32 - per_row["packed"][0]) < 0.5
  # Supervised tokens per row scale with the examples per row.
  ratio = per_row["packed"][1] / per_row["unpacked"][1]
  assert ratio == pytest.approx(per_row["packed"][0], rel=1e-6)
