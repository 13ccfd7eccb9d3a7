"""A save cut off by a kill leaves a temporary directory; the next run removes it."""

import time

import ml_collections

from leo_mini_jax.training import checkpoint as checkpoint_lib


def test_cut_off_saves_are_removed_at_start(tmp_path):
  steps = tmp_path / "checkpoints"
  leftover = steps / "7.orbax-checkpoint-tmp-1700000000"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "blob").write_bytes(b"x" * 1000)
  kept = steps / "3.broken-20260101-000000"  # set aside for inspection: not touched
  kept.mkdir()
  cfg = ml_collections.ConfigDict({"keep": 2, "keep_period": None, "async_save": False})
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), cfg)
  try:
    deadline = time.monotonic() + 30  # orbax removes them on a background thread
    while leftover.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not leftover.exists()
    assert kept.exists()
    assert checkpointer.all_steps() == []
  finally:
    checkpointer.close()
