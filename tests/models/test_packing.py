"""Packed rows give every example exactly what it gets alone in its own row.

The same eight examples (mixed lengths, six with an image, two text-only) run unpacked
(eight rows) and packed (four rows, up to two images each). Per example: the logits of
each of its LLM tokens, its loss terms and its MMoE routing must agree (f32, 1e-5), and so
must the batch's gradients — for stage 2 (EAGLE fusion) and stage 3 (CoTR + MMoE), on one
device and on four. A second test perturbs one example of a packed row and checks that
its row-mate does not move at all.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax import batch as batch_lib
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.models import sequence as sequence_lib
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import step as step_lib

RESOLUTION = 64
# (text length, has image) per example; rows of the packed batch, at most two images each.
EXAMPLES = [(9, True), (6, True), (12, True), (5, False), (7, True), (4, False), (8, True),
            (10, True)]
ROWS = [[0, 1], [2, 3], [4, 5, 6], [7]]
SLOTS = 2


def _examples(seed=0):
  rng = np.random.default_rng(seed)
  examples = []
  for length, has_image in EXAMPLES:
    ids = rng.integers(3, 250, length).astype(np.int32)
    ids[0] = 1  # BOS: never supervised, as the pipeline's rows
    if has_image:
      ids[1] = IMAGE_PLACEHOLDER_ID
    instruction = np.zeros(length, np.int32)
    instruction[2:length // 2] = 1
    loss = np.zeros(length, np.int32)
    loss[length // 2 + 1:] = 1
    image = (rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3)).astype(np.uint8)
             if has_image else None)
    examples.append(dict(input_ids=ids, instruction_mask=instruction, loss_mask=loss,
                         image=image))
  return examples


def _unpacked(examples):
  length = max(len(e["input_ids"]) for e in examples)
  batch = {k: np.zeros((len(examples), length), np.int32)
           for k in ("input_ids", "attention_mask", "loss_mask", "instruction_mask")}
  batch["image"] = np.zeros((len(examples), RESOLUTION, RESOLUTION, 3), np.uint8)
  batch["has_image"] = np.zeros(len(examples), bool)
  for row, e in enumerate(examples):
    n = len(e["input_ids"])
    for key in ("input_ids", "loss_mask", "instruction_mask"):
      batch[key][row, :n] = e[key]
    batch["attention_mask"][row, :n] = 1
    if e["image"] is not None:
      batch["image"][row], batch["has_image"][row] = e["image"], True
  return batch


def _packed(examples, rows=ROWS):
  length = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
  batch = {k: np.zeros((len(rows), length), np.int32)
           for k in ("input_ids", "attention_mask", "loss_mask", "instruction_mask",
                     "segment_ids")}
  batch["image"] = np.zeros((len(rows), SLOTS, RESOLUTION, RESOLUTION, 3), np.uint8)
  batch["has_image"] = np.zeros((len(rows), SLOTS), bool)
  for r, row in enumerate(rows):
    offset, slot = 0, 0
    for segment, i in enumerate(row, start=1):
      e = examples[i]
      n = len(e["input_ids"])
      for key in ("input_ids", "loss_mask", "instruction_mask"):
        batch[key][r, offset:offset + n] = e[key]
      batch["attention_mask"][r, offset:offset + n] = 1
      batch["segment_ids"][r, offset:offset + n] = segment
      if e["image"] is not None:
        batch["image"][r, slot], batch["has_image"][r, slot] = e["image"], True
        slot += 1
      offset += n
  return batch


@functools.lru_cache(maxsize=None)
def _model(stage):
  """(model, params, jitted forward, jitted segment ids, jitted gradient), one per stage
  for the whole module: every test reuses the compiled programs."""
  arg = "stage=2" if stage == 2 else "stage=3,tokens=4"
  model_cfg = tiny.get_config(arg).model
  # CLIP alone: packing is about rows, not experts, and ConvNeXt triples compile time.
  model_cfg.experts = [e for e in model_cfg.experts if e["name"] == "clip"]
  config = leo_mini_lib.LeoMiniConfig.from_config(model_cfg)
  model = leo_mini_lib.LeoMini(config)
  batch = _unpacked(_examples())
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"])
  # Fresh LoRA B matrices are zero, which would hide the routed experts: give them values.
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(0, 0.02, v.shape), v.dtype)
      if "experts_b" in jax.tree_util.keystr(p) or "general_b" in jax.tree_util.keystr(p)
      else v for p, v in leaves])
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
  segments = jax.jit(lambda p, b: model.apply({"params": p}, b, method=_segments))
  return model, params, forward, segments, jax.jit(jax.grad(_objective(model)))


def _per_example(values, segment_ids, batch_rows):
  """values [R, T, ...] → one array per example of its real LLM positions, in order."""
  out = []
  for r, row in enumerate(batch_rows):
    for segment in range(1, len(row) + 1):
      out.append(values[r][segment_ids[r] == segment])
  return out


def _objective(model):
  def objective(params, batch):
    logits, aux = model.apply({"params": params}, batch)
    loss_sum, count, _ = step_lib.token_losses(logits, aux)
    return loss_sum / count + aux["balance_loss"]
  return objective


def _check_equal(stage, unpacked, packed):
  _, params, forward, segments, grad_fn = _model(stage)
  unpacked_rows = [[i] for i in range(len(EXAMPLES))]
  want_logits, want_aux = jax.device_get(forward(params, unpacked))
  got_logits, got_aux = jax.device_get(forward(params, packed))
  want_ids = np.asarray(want_aux["attention_mask"])  # one segment per unpacked row
  got_ids = np.asarray(segments(params, packed))
  want = _per_example(want_logits, want_ids, unpacked_rows)
  got = _per_example(got_logits, got_ids, ROWS)
  order = [i for row in ROWS for i in row]
  for position, i in enumerate(order):
    assert got[position].shape == want[i].shape, f"example {i}"
    np.testing.assert_allclose(got[position], want[i], atol=1e-5, rtol=1e-5,
                               err_msg=f"logits of example {i}")
  # The supervised targets (an unsupervised last token's target is the next example's).
  supervised = lambda aux: np.asarray(aux["targets"]) * np.asarray(aux["target_mask"])
  for key, want_values, got_values in (
      ("target_mask", want_aux["target_mask"], got_aux["target_mask"]),
      ("targets", supervised(want_aux), supervised(got_aux))):
    w = _per_example(np.asarray(want_values), want_ids, unpacked_rows)
    g = _per_example(np.asarray(got_values), got_ids, ROWS)
    for position, i in enumerate(order):
      np.testing.assert_array_equal(g[position], w[i], err_msg=f"{key} of example {i}")
  want_loss = step_lib.token_losses(want_logits, want_aux)
  got_loss = step_lib.token_losses(got_logits, got_aux)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_aux["balance_loss"], want_aux["balance_loss"], rtol=1e-5)
  if "top_expert" in want_aux["routing"]:
    w = _per_example(np.moveaxis(want_aux["routing"]["top_expert"], 0, -1), want_ids,
                     unpacked_rows)
    g = _per_example(np.moveaxis(got_aux["routing"]["top_expert"], 0, -1), got_ids, ROWS)
    for position, i in enumerate(order):
      np.testing.assert_array_equal(g[position], w[i], err_msg=f"routing of example {i}")
  want_grads = jax.device_get(grad_fn(params, unpacked))
  got_grads = jax.device_get(grad_fn(params, packed))
  # 1e-5 of each leaf's scale; leaves whose gradient is zero analytically (a key bias:
  # softmax ignores it) hold float noise, compared at 1e-6 of the largest gradient.
  largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grads))
  for (path, w), g in zip(jax.tree.flatten_with_path(want_grads)[0],
                          jax.tree.leaves(got_grads)):
    scale = max(1e-5 * float(np.max(np.abs(w))), 1e-6 * largest)
    np.testing.assert_allclose(g, w, atol=scale, rtol=1e-5,
                               err_msg=f"gradient of {jax.tree_util.keystr(path)}")


def _segments(model, batch):
  """The packed forward's LLM-sequence segment ids (a method to run under apply)."""
  sequence, _ = model._inputs(batch)  # pylint: disable=protected-access
  length = model.training_sequence_length(batch["input_ids"].shape[1],
                                          batch["has_image"].shape[1])
  return sequence["segment_ids"][:, :length]


@pytest.mark.parametrize("stage", [2, 3])
def test_packed_rows_equal_unpacked_rows_on_one_device(stage):
  examples = _examples()
  _check_equal(stage, _unpacked(examples), _packed(examples))


def test_packed_rows_equal_unpacked_rows_on_four_devices():
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake devices"
  mesh = mesh_lib.make_mesh(dict(data=4))
  examples = _examples()
  shard = lambda batch: mesh_lib.make_global_batch(
      {k: batch[k] for k in batch_lib.batch_keys(batch)}, mesh)
  unpacked, packed = shard(_unpacked(examples)), shard(_packed(examples))
  assert len(packed["input_ids"].sharding.device_set) == 4
  with mesh_lib.activate(mesh):
    _check_equal(3, unpacked, packed)


@pytest.mark.parametrize("stage", [2, 3])
def test_an_example_does_not_see_its_row_mate(stage):
  """Row 0 packs examples 0 and 1: changing one's tokens, instruction and image leaves
  every logit and routing choice of the other bit-identical (1 → 0 catches pooled CoTR or
  router context shared by the row, 0 → 1 attention across examples)."""
  _, params, forward, segments, _ = _model(stage)
  examples = _examples()
  before, before_aux = jax.device_get(forward(params, _packed(examples)))
  ids = np.asarray(segments(params, _packed(examples)))
  for changed, kept in ((1, 0), (0, 1)):
    other = [dict(e) for e in examples]
    other[changed] = dict(_examples(seed=5)[changed])
    after, after_aux = jax.device_get(forward(params, _packed(other)))
    mine, theirs = ids[0] == kept + 1, ids[0] == changed + 1
    assert np.abs(before[0][theirs] - after[0][theirs]).max() > 1e-3  # it did change
    np.testing.assert_array_equal(before[0][mine], after[0][mine],
                                  err_msg=f"example {kept} saw example {changed}")
    if "top_expert" in before_aux["routing"]:
      np.testing.assert_array_equal(before_aux["routing"]["top_expert"][:, 0][:, mine],
                                    after_aux["routing"]["top_expert"][:, 0][:, mine])


def test_positions_restart_and_targets_stop_at_each_example():
  examples = _examples()
  packed = _packed(examples)
  # Hostile labels: example 5's first token marked as an answer. Example 4's last token
  # must still not learn to predict it (it belongs to another example).
  start_of_5 = len(examples[4]["input_ids"])
  packed["loss_mask"][2, start_of_5] = 1
  dim, num_visual = 2, 3
  text = jnp.asarray(np.repeat(packed["input_ids"][..., None], dim, -1), jnp.float32)
  visual = jnp.full((len(ROWS), SLOTS, num_visual, dim), -1.0)
  out = jax.device_get(sequence_lib.assemble_sequence(text, visual, packed))
  # Row 2: example 4 (image), 5 (text-only), 6 (image).
  lengths = [len(examples[i]["input_ids"]) + (num_visual - 1) * EXAMPLES[i][1]
             for i in ROWS[2]]
  want_positions = np.concatenate([np.arange(n) for n in lengths])
  np.testing.assert_array_equal(out["positions"][2, :sum(lengths)], want_positions)
  np.testing.assert_array_equal(out["segment_ids"][2, :sum(lengths)],
                                np.repeat([1, 2, 3], lengths))
  assert not out["segment_ids"][2, sum(lengths):].any()
  # The last token of an example never has the next example's first token as its target.
  ends = np.cumsum(lengths) - 1
  assert not out["target_mask"][2, ends].any()
  np.testing.assert_array_equal(out["is_visual"][2].sum(), 2 * num_visual)
