"""A resume whose records changed since the checkpoint stops (or warns) instead of
silently reading another order."""

import json

import pytest

from leo_mini_jax.data import fingerprint
from leo_mini_jax.data import llava
from leo_mini_jax.data import pipeline
from leo_mini_jax.training import recovery


def _records(n):
  return [{"id": f"r{i}", "image": f"{i}.png",
           "conversations": [{"from": "human", "value": "<image>\\nq"},
                             {"from": "gpt", "value": "a"}]} for i in range(n)]


def test_removing_a_record_changes_the_fingerprint():
  full = llava.LlavaSource(_records(5), "/images")
  same = llava.LlavaSource(_records(5), "/images")
  fewer = llava.LlavaSource(_records(5)[:2] + _records(5)[3:], "/images")
  other_image = llava.LlavaSource(_records(5), "/images")
  other_image._records[4] = dict(other_image._records[4], image="x.png")
  prints = [fingerprint.source_fingerprint(s) for s in (full, same, fewer, other_image)]
  assert prints[0] == prints[1]
  assert len(set(prints[1:])) == 3
  kept = pipeline.Subset(full, [0, 1, 2])
  assert (fingerprint.source_fingerprint(kept)
          != fingerprint.source_fingerprint(pipeline.Subset(full, [0, 2, 3])))


def test_the_train_pipeline_carries_the_fingerprint(tmp_path):
  from tests.training.conftest import small_config  # pylint: disable=g-import-not-at-top
  config = small_config(1)
  a = pipeline.make_dataset(config.data).fingerprint
  config.data.num_train = 63
  assert a and a != pipeline.make_dataset(config.data).fingerprint


def test_a_changed_fingerprint_stops_or_warns(caplog):
  position = {"examples_seen": 16, "data_fingerprint": "aaaa"}
  assert not recovery.check_data_fingerprint(position, "aaaa")
  assert not recovery.check_data_fingerprint({"examples_seen": 16}, "bbbb")  # old ckpt
  with pytest.raises(recovery.DataChangedError, match=r"aaaa → bbbb.*position 16"):
    recovery.check_data_fingerprint(position, "bbbb")
  assert recovery.check_data_fingerprint(position, "bbbb", "warn")
  assert "config.data.on_change='warn'" in caplog.text


def test_resume_with_a_record_removed_stops_at_start(tmp_path, caplog):
  from tests.training.conftest import small_config  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.training import loop  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  workdir = str(tmp_path / "run")
  config = small_config(1, total_steps=3)
  loop.train(config, workdir, progress=False, mesh=mesh, stop_at=1)
  config.data.num_train = 63  # one record fewer
  with pytest.raises(recovery.DataChangedError, match="records changed since the checkpoint"):
    loop.train(config, workdir, progress=False, mesh=mesh, stop_at=2)
  config.data.on_change = "warn"
  assert loop.train(config, workdir, progress=False, mesh=mesh, stop_at=2)["stopped"] == (
      "stop_at")
  assert "going on (config.data.on_change='warn')" in caplog.text
