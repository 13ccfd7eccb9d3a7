"""workload.synthetic_batch: the full-length batch the speed benchmarks time."""

import numpy as np

from configs import tiny
from leo_mini_jax.evaluation import workload


def test_every_row_is_a_full_length_image_example_with_an_answer():
  config = tiny.get_config("stage=2")
  batch = workload.synthetic_batch(config)
  rows, length = config.data.batch_size, config.data.max_length
  assert batch["input_ids"].shape == (rows, length)
  assert (batch["input_ids"][:, 2:] > 0).all()  # no padding anywhere past the prefix
  half = length // 2
  assert (batch["loss_mask"][:, half:] == 1).all() and (batch["loss_mask"][:, :half] == 0).all()
  assert (batch["instruction_mask"][:, 2:half] == 1).all()
  assert batch["image"].dtype == np.uint8 and batch["image"].shape[0] == rows
  assert len(np.unique(batch["image"])) > 200  # random pixels, not a constant image
  again = workload.synthetic_batch(config)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)  # deterministic
