"""Resume: 2 steps + save + restart + 2 steps equals 4 uninterrupted steps; other meshes."""

import json
import os

import jax
import numpy as np

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_resume_equals_uninterrupted_run(tmp_path, one_device_mesh):
  config = small_config(3, total_steps=4)
  straight = loop.train(config, str(tmp_path / "straight"), progress=False,
                        mesh=one_device_mesh)

  split_dir = str(tmp_path / "split")
  first = loop.train(config, split_dir, progress=False, mesh=one_device_mesh, stop_at=2)
  assert int(first["state"].step) == 2
  resumed = loop.train(config, split_dir, progress=False, mesh=one_device_mesh)
  assert int(resumed["state"].step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"].params)),
                  jax.tree.leaves(jax.device_get(straight["state"].params))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Same data order: steps 3 and 4 saw the same batches (their losses agree).
  want, got = _losses(str(tmp_path / "straight")), _losses(split_dir)
  for step in (1, 2, 3, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6)

  # Restoring the same checkpoint onto a 2×2 mesh gives the same values, now sharded.
  mesh = mesh_lib.make_mesh(dict(fsdp=2, tensor=2))
  setup = loop.TrainSetup(config, mesh)
  checkpointer = checkpoint_lib.Checkpointer(split_dir, config.checkpoint)
  restored = checkpointer.restore(4, setup.abstract_state)
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  shardings = [x.sharding for x in jax.tree.leaves(restored.params)]
  assert any(len(s.device_set) == 4 and not s.is_fully_replicated for s in shardings)


def test_data_position_is_saved_beside_the_train_state(tmp_path, one_device_mesh):
  """The saved position restarts the stream where it stopped, for any process count."""
  config = small_config(2)
  setup = loop.TrainSetup(config, one_device_mesh)
  state = setup.init_state(0)
  iterator = pipeline_lib.make_dataset(config.data, split="train").iterator()
  next(iterator), next(iterator)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
  checkpointer.save(2, state, {"examples_seen": 2 * config.data.batch_size, "seed": 0})
  checkpointer.wait()
  expected = next(iterator)
  position = loop.data_start(checkpointer, 2, config)
  checkpointer.close()
  assert position == 16
  got = next(pipeline_lib.make_dataset(config.data, split="train",
                                       start_position=position).iterator())
  for key in pipeline_lib.BATCH_KEYS:
    np.testing.assert_array_equal(got[key], expected[key])
  # Two processes from the same position read the same rows between them.
  halves = [next(pipeline_lib.make_dataset(config.data, split="train", process_index=p,
                                           process_count=2, start_position=position
                                           ).iterator()) for p in (0, 1)]
  rows = sorted(map(bytes, np.concatenate([h["input_ids"] for h in halves])))
  assert rows == sorted(map(bytes, expected["input_ids"]))


def test_init_from_restores_what_exists_and_names_what_does_not(tmp_path, one_device_mesh):
  stage2 = small_config(2, total_steps=1)
  summary = loop.train(stage2, str(tmp_path / "s2"), progress=False, mesh=one_device_mesh)
  stage3 = small_config(3, init_from=str(tmp_path / "s2"))
  setup = loop.TrainSetup(stage3, one_device_mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "s3"), stage3.checkpoint)
  state, how = loop.initial_state(setup, checkpointer, None)
  checkpointer.close()
  assert "fresh" in how
  old = jax.device_get(summary["state"].params)
  new = jax.device_get(state.params)
  np.testing.assert_array_equal(new["projector"]["fc1"]["kernel"],
                                old["projector"]["fc1"]["kernel"])
  np.testing.assert_array_equal(new["llm"]["layers"]["mlp"]["up_proj"]["kernel"],
                                old["llm"]["layers"]["mlp"]["up_proj"]["kernel"])
  assert "reducer" in new and "mmoe_up_proj" in new["llm"]["layers"]["mlp"]

  # Stage 2 from a stage-3 checkpoint: everything stage 3 added is unexpected, by name.
  back = small_config(2, init_from=str(tmp_path / "s2"))
  checkpoints_lib.save_params(str(tmp_path / "params3"), new)
  back.init_from = str(tmp_path / "params3")
  setup = loop.TrainSetup(back, one_device_mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "s2b"), back.checkpoint)
  try:
    loop.initial_state(setup, checkpointer, None)
    raise AssertionError("expected a ValueError")
  except ValueError as e:
    message = str(e)
  finally:
    checkpointer.close()
  assert "unexpected" in message and "reducer/cotr/clip_queries" in message
  assert "llm/layers/mlp/mmoe_router/out_proj/kernel" in message


def _scalar_events(workdir, run=""):
  """(kind, step, tag, value) of every event of `workdir/tensorboard/<run>`, files in
  write order: 'start' rows are SessionLog START markers (tag and value None)."""
  import glob  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", run, "events.*")),
                     key=os.path.getmtime):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:
        rows.append(("start", event.step, None, None))
      for value in event.summary.value:
        rows.append(("scalar", event.step, value.tag, value.simple_value))
  return rows


def test_resumed_run_shows_each_tensorboard_step_once(tmp_path, one_device_mesh):
  """A run killed after logging steps 3–4 but before saving them resumes from step 2 and
  logs 3–4 again; TensorBoard, rebuilt from metrics.jsonl at the restart, shows each step
  once, with the resumed run's values."""
  pytest = __import__("pytest")
  pytest.importorskip("tensorboardX")
  import shutil  # pylint: disable=g-import-not-at-top
  config = small_config(3, total_steps=4)
  config.checkpoint.every_steps = 2
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, progress=False, mesh=one_device_mesh)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the kill before its save
  loop.train(config, workdir, progress=False, mesh=one_device_mesh)
  shown = {}
  for kind, step, tag, value in _scalar_events(workdir):
    assert kind == "scalar"
    assert (step, tag) not in shown, f"step {step} {tag} shown twice"
    shown[(step, tag)] = value
  assert sorted({s for s, _ in shown}) == [1, 2, 3, 4]
  resumed = _losses(workdir)
  for step in (1, 2, 3, 4):
    assert shown[(step, "loss")] == pytest.approx(resumed[step])
