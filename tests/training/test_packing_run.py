"""Packed training runs: the schedule counts packed rows, the checkpoint's position says it
counts rows (and a resume that switches packing stops), packing settings are validated,
the throughput metrics count real examples; and a packed run resumes with identical
losses."""

import json
import os

import numpy as np
import pytest

from leo_mini_jax import config_validation
from leo_mini_jax.data import packing
from leo_mini_jax.data import pipeline
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import data_position
from leo_mini_jax.training import loop
from leo_mini_jax.training import metrics as metrics_lib
from leo_mini_jax.training import optimizer as optimizer_lib
from tests.training.conftest import small_config


def packed_config(stage=3, **overrides):
  """Synthetic rows of ~50 tokens in 160-token rows: about three examples per row."""
  packed = {"data.packing": True, "data.max_length": 160, "data.max_images_per_row": 4,
            "data.packing_window": 8}
  return small_config(stage, **{**packed, **overrides})


def test_derived_length_counts_packed_rows():
  config = packed_config(total_steps=0, num_epochs=2)
  prepared = pipeline.prepare_source(config.data, split="train", process_index=0,
                                     process_count=1)
  plan = packing.row_plan(prepared, config.data, config.data.seed)
  rows = plan.rows_of_epochs(2.0)
  assert rows == plan.epoch_rows(0) + plan.epoch_rows(1) and rows < 64  # 3-ish per row
  steps, how = optimizer_lib.derived_total_steps(config, 64, rows)
  assert steps == -(-rows // 8)
  assert how == (f"64 records → {round(rows / 2)} packed rows × 2 epochs / batch 8 → "
                 f"{steps} steps")
  # Half an epoch: half of epoch 0's rows, rounded up.
  assert plan.rows_of_epochs(0.5) == -(-plan.epoch_rows(0) // 2)


def test_the_position_counts_rows_and_packing_cannot_switch_mid_run():
  spec = {"capacity": 160, "max_images": 4, "window": 8, "counts_visual_tokens": False,
          "visual_tokens": 1}
  packed = data_position.position_record(24, spec)
  assert packed == {"rows_seen": 24, "packing": spec}
  assert data_position.position_of(packed, True, 3) == 24
  with pytest.raises(data_position.DataPositionError,
                     match=r"counts packed rows .*data.packing=True.*data.packing=False"):
    data_position.position_of(packed, False, 3)
  unpacked = data_position.position_record(24, None)
  with pytest.raises(data_position.DataPositionError, match="counts examples"):
    data_position.position_of(unpacked, True, 3)
  assert not data_position.check_packing_spec(packed, spec)
  with pytest.raises(data_position.DataPositionError, match=r"max_images 4 → 2"):
    data_position.check_packing_spec(packed, dict(spec, max_images=2))
  assert data_position.check_packing_spec(packed, dict(spec, max_images=2), "warn")


def test_packing_settings_are_validated_by_name():
  config = packed_config(**{"data.max_images_per_row": 0})
  with pytest.raises(config_validation.ConfigError, match="config.data.max_images_per_row"):
    config_validation.validate_config(config, device_count=0, trace_model=False)
  # Counting visual tokens (N^V = 4 here), 160 tokens hold at most 40 images.
  config = packed_config(**{"data.max_images_per_row": 41,
                            "data.max_length_counts_visual_tokens": True})
  with pytest.raises(config_validation.ConfigError,
                     match=r"data.max_images_per_row: 41 .* at most 40 images"):
    config_validation.validate_config(config, device_count=0, trace_model=False)
  config.data.max_images_per_row = 40
  config_validation.validate_config(config, device_count=0, trace_model=False)


def test_throughput_counts_real_examples_and_the_density():
  throughput = metrics_lib.Throughput(row_length=100, process_count=2)
  throughput.start()
  batch = {"attention_mask": np.array([[1] * 90 + [0] * 10, [1] * 50 + [0] * 50]),
           "segment_ids": np.array([[1] * 30 + [2] * 60 + [0] * 10,
                                    [1] * 50 + [0] * 50]),
           "has_image": np.array([[True, True], [True, False]])}
  counts = packing.batch_counts(batch, visual_tokens=1)
  assert counts == {"examples": 3, "rows": 2, "budget_tokens": 140}
  throughput.add([{"tokens": 10.0, "supervised_tokens": 4.0}], [counts])
  ratio = lambda r: r["examples_per_second"] / r["supervised_tokens_per_second"]
  rates = throughput.rates()
  # Without the step's global 'examples' metric: this process's 3 × 2 processes.
  assert ratio(rates) == pytest.approx(6 / 4)
  assert rates["packing_density"] == pytest.approx(0.7)
  throughput.add([{"tokens": 10.0, "supervised_tokens": 4.0, "examples": 10.0}], [counts])
  rates = throughput.rates()
  assert ratio(rates) == pytest.approx(16 / 8)
