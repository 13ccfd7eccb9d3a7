"""Packed training runs: the schedule counts packed rows, the checkpoint's position says it
counts rows (and a resume that switches packing stops), packing settings are validated,
the logs report real examples/s; and a packed run resumes with identical
losses."""

import json
import os

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


def test_throughput_reports_real_examples_and_supervised_tokens_per_second():
  throughput = metrics_lib.Throughput()
  assert throughput.rates() == {}
  throughput.start()
  throughput.add([{"tokens": 100.0, "supervised_tokens": 40.0, "examples": 12.0},
                  {"tokens": 100.0, "supervised_tokens": 20.0, "examples": 9.0}])
  rates = throughput.rates()
  assert rates["examples_per_second"] / rates["supervised_tokens_per_second"] == \
      pytest.approx(21 / 60)
  assert rates["tokens_per_second"] / rates["examples_per_second"] == pytest.approx(200 / 21)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def test_killed_packed_run_resumes_with_identical_losses(tmp_path, one_device_mesh):
  """Steps 3–4 of a packed run, killed after saving step 2 and run again from there,
  have exactly the losses they had; the position counts rows."""
  import shutil  # pylint: disable=g-import-not-at-top
  config = packed_config(3, total_steps=4)
  config.checkpoint.every_steps = 2
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, progress=False, mesh=one_device_mesh)
  first = _losses(workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the kill before its save
  resumed = loop.train(config, workdir, progress=False, mesh=one_device_mesh)
  assert int(resumed["state"].step) == 4
  again = _losses(workdir)
  for step in (1, 2, 3, 4):
    assert again[step]["loss"] == first[step]["loss"], step
  # Real examples per step exceed the 8 rows; the logs carry the rates and the density.
  assert again[4]["examples"] > 8 * 2
  assert again[4]["examples_per_second"] > 0 and 0.5 < again[4]["density"] <= 1
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    position = checkpointer.data_position(4)
    assert position["rows_seen"] == 4 * 8 and "examples_seen" not in position
    assert position["packing"]["max_images"] == 4
    assert loop.data_start(checkpointer, 4, config) == 32
    # Resuming this workdir with packing off stops at start, saying why.
    with pytest.raises(data_position.DataPositionError, match="counts packed rows"):
      loop.data_start(checkpointer, 4, packed_config(3, **{"data.packing": False}))
  finally:
    checkpointer.close()
