"""The loop closes what it opened, in one order, on every way out of it."""

import pytest

from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import metrics as metrics_lib
from tests.training.conftest import small_config


class _Interrupted(RuntimeError):
  """Raised from inside the loop by the test's data iterator."""


def _watch_teardown(monkeypatch, fail_at_batch: int | None) -> list[str]:
  """Records the closing of the data iterator, checkpointer and metrics writer the loop
  makes; the data iterator raises at batch `fail_at_batch` (counted from 1)."""
  closed = []
  make_dataset = pipeline_lib.make_dataset

  class Iterator:
    def __init__(self, inner):
      self.inner, self.served = inner, 0

    def __next__(self):
      self.served += 1
      if self.served == fail_at_batch:
        raise _Interrupted(f"batch {self.served}")
      return next(self.inner)

    def close(self):
      closed.append("data")
      self.inner.close()

  def dataset(*args, **kwargs):
    pipeline = make_dataset(*args, **kwargs)
    inner_iterator = pipeline.iterator
    pipeline.iterator = lambda: Iterator(inner_iterator())
    return pipeline

  class Checkpointer(checkpoint_lib.Checkpointer):
    def wait(self):
      closed.append("checkpoint wait")
      super().wait()

    def close(self):
      closed.append("checkpoint close")
      super().close()

  class Writer(metrics_lib.MetricsWriter):
    def close(self):
      closed.append("metrics")
      super().close()

  monkeypatch.setattr(loop.pipeline_lib, "make_dataset", dataset)
  monkeypatch.setattr(loop.checkpoint_lib, "Checkpointer", Checkpointer)
  monkeypatch.setattr(loop.metrics_lib, "MetricsWriter", Writer)
  return closed


@pytest.mark.parametrize("fail_at_batch", [3, None], ids=["exception", "finished"])
def test_every_exit_closes_the_same_things_in_the_same_order(
    tmp_path, one_device_mesh, monkeypatch, fail_at_batch):
  closed = _watch_teardown(monkeypatch, fail_at_batch)
  config = small_config(1, total_steps=4)
  if fail_at_batch is None:
    summary = loop.train(config, str(tmp_path), progress=False, mesh=one_device_mesh)
    assert summary["stopped"] == "done"
  else:  # a step ran, the next batch fails: the run stops with that error
    with pytest.raises(_Interrupted, match="batch 3"):
      loop.train(config, str(tmp_path), progress=False, mesh=one_device_mesh)
  # Newest first; the checkpointer finishes its saves before it closes.
  assert closed == ["metrics", "data", "checkpoint wait", "checkpoint close"]
