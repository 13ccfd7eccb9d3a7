"""Generation, answer metrics and FLOP counting."""

import dataclasses
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.evaluation import efficiency, generate, metrics
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.models import llama
from leo_mini_jax.evaluation import runner
from leo_mini_jax.training import loop
from leo_mini_jax.training import metrics as metrics_lib
from leo_mini_jax.batch import dummy_batch
from tests.training import test_resume


def test_greedy_generation_matches_step_by_step_full_forward():
  config = tiny.get_config("stage=3,tokens=4")
  config.data.max_length = 12
  model = leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config.model))
  batch = dummy_batch(config, 2)
  rng = np.random.default_rng(0)
  batch["input_ids"][:, 2:] = rng.integers(1, 200, (2, 10))
  batch["attention_mask"][1, 8:] = 0
  batch["instruction_mask"][:, 2:6] = 1
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))["params"]
  tokens = np.asarray(generate.make_generate(model, 4, eos_id=-1)(params, batch)["tokens"])
  # One compiled forward: every prefix right-padded to the same width.
  width = batch["input_ids"].shape[1] + 4
  forward = jax.jit(model.apply)
  for row in range(2):
    length = int(batch["attention_mask"][row].sum())
    ids = list(batch["input_ids"][row, :length])
    for step in range(4):
      single = {k: v[row:row + 1] for k, v in batch.items()}
      single["input_ids"] = np.zeros((1, width), np.int32)
      single["input_ids"][0, :len(ids)] = ids
      single["attention_mask"] = (np.arange(width) < len(ids)).astype(np.int32)[None]
      single["instruction_mask"] = np.zeros((1, width), np.int32)
      single["instruction_mask"][0, 2:6] = 1
      for key in ("loss_mask",):
        if key in single:
          single[key] = np.zeros((1, width), np.int32)
      logits, aux = forward({"params": params}, single)
      last = int(np.asarray(aux["attention_mask"]).sum()) - 1
      next_token = int(np.argmax(logits[0, last]))
      assert tokens[row, step] == next_token, (row, step)
      ids.append(next_token)


def _reference_counts(model, params, batch, valid):
  """The routing counts of one full forward over the prompts (what evaluation ran as an
  extra pass before generation returned them): first-choice experts of the real prompt
  tokens of the valid rows."""
  _, aux = model.apply({"params": params}, batch)
  top = aux["routing"]["top_expert"]  # [layers, B, T]
  mask = (aux["attention_mask"] > 0) & valid[:, None]
  experts = jnp.arange(model.config.llm.mmoe.num_experts)
  hits = (top[..., None] == experts) & mask[None, :, :, None]
  return np.asarray(jnp.sum(hits, axis=(1, 2)), np.float32)


def test_generation_returns_the_routing_of_a_full_forward():
  """Prompt counts from the prefill equal a full forward's over the same prompts (padding
  and invalid rows left out); each generated token's expert equals the full forward's over
  prompt + generated tokens at that token's position (what ask prints)."""
  config = tiny.get_config("stage=3,tokens=4")
  model = leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config.model))
  batch = dummy_batch(config, 3)
  width = 16
  rng = np.random.default_rng(1)
  batch["input_ids"] = np.zeros((3, width), np.int32)
  batch["input_ids"][:, 0], batch["input_ids"][:, 1] = 1, leo_mini_lib.IMAGE_PLACEHOLDER_ID
  batch["input_ids"][:, 2:] = rng.integers(3, 200, (3, width - 2))
  batch["input_ids"][2, 1] = 5  # a text-only row
  lengths = np.array([16, 9, 12])
  batch["attention_mask"] = (np.arange(width) < lengths[:, None]).astype(np.int32)
  batch["instruction_mask"] = np.zeros((3, width), np.int32)
  batch["instruction_mask"][:, 2:7] = 1
  batch["loss_mask"] = np.zeros((3, width), np.int32)
  batch["has_image"] = np.array([True, True, False])
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))["params"]
  valid = np.array([True, False, True])
  new = 5
  out = jax.jit(generate.make_generate(model, new, eos_id=-1))(params, batch, valid)
  reference = _reference_counts(model, params, batch, valid)
  assert (reference > 0).sum() > reference.shape[0], reference  # more than one expert used
  np.testing.assert_array_equal(np.asarray(out["prompt_counts"]), reference)
  visual = model.config.num_visual_tokens
  assert reference.sum() == model.config.llm.num_layers * (
      lengths[valid].sum() + (visual - 1) * batch["has_image"][valid].sum())
  # The generated tokens, appended to each prompt and run through one full forward.
  tokens = np.asarray(out["tokens"])
  full = {k: np.asarray(v) for k, v in batch.items()}
  for key in ("input_ids", "attention_mask", "instruction_mask", "loss_mask"):
    full[key] = np.concatenate([full[key], np.zeros((3, new), np.int32)], axis=1)
  for row, n in enumerate(lengths):
    full["input_ids"][row, n:n + new] = tokens[row]
    full["attention_mask"][row, :n + new] = 1
  _, aux = jax.jit(model.apply)({"params": params}, full)
  top = np.asarray(aux["routing"]["top_expert"])
  for row, n in enumerate(lengths):
    start = n + (visual - 1 if batch["has_image"][row] else 0)
    np.testing.assert_array_equal(np.asarray(out["top_expert"])[:, row],
                                  top[:, row, start:start + new])


def test_decode_answers_cuts_at_the_stop_token():
  class Chars:
    def decode(self, ids):
      return "".join(chr(i) for i in ids)
  tokens = np.array([[32, 114, 101, 100, 0, 120], [98, 0, 0, 0, 0, 0]])
  assert generate.decode_answers(tokens, Chars(), (0,)) == ["red", "b"]


@pytest.mark.parametrize("prediction,reference,same", [
    ("The Circle.", "circle", True), ("two", "2", True), (" RED ", "red", True),
    ("square", "circle", False)])
def test_normalised_exact_match(prediction, reference, same):
  assert metrics.exact_match(prediction, reference) is same


def test_accuracy_and_blind_baseline_per_type():
  refs = ["red", "red", "blue", "circle", "square", "square"]
  types = ["color"] * 3 + ["shape"] * 3
  preds = ["red", "blue", "blue", "circle", "circle", "square"]
  acc = metrics.accuracy_by_type(preds, refs, types)
  assert acc == {"color": 2 / 3, "overall": 4 / 6, "shape": 2 / 3}
  blind = metrics.blind_baseline(refs, types)
  assert blind == {"color": 2 / 3, "overall": 4 / 6, "shape": 2 / 3}


def test_analytic_llm_flops_match_xla_count():
  cfg = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160,
                          num_layers=2, num_heads=4, num_kv_heads=2, scan_layers=False)
  model = llama.LlamaForCausalLM(cfg)
  ids = jnp.zeros((1, 24), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract))
  analysis = jax.jit(lambda p, i: model.apply({"params": p}, i)).lower(abstract, ids) \
      .compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  # XLA also counts norms, softmax and rotary elementwise work: within a few percent.
  np.testing.assert_allclose(efficiency.llm_prefill_flops(cfg, 24), analysis["flops"],
                             rtol=0.1)


def test_fewer_visual_tokens_cost_fewer_prefill_flops():
  cfg = leo_mini_lib.LeoMiniConfig.from_config(tiny.get_config("stage=3,tokens=4").model)
  few = efficiency.xla_prefill_flops(cfg, 40, 64)
  many_cfg = dataclasses.replace(cfg, reducer=dataclasses.replace(cfg.reducer,
                                                                  num_visual_tokens=64))
  many = efficiency.xla_prefill_flops(many_cfg, 40, 64)
  assert 0 < few < many


def test_decoding_stops_when_every_valid_row_has_ended():
  config = tiny.get_config("stage=3,tokens=4")
  config.data.max_length = 12
  model = leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config.model))
  batch = dummy_batch(config, 2)
  batch["input_ids"][:, 2:] = np.random.default_rng(1).integers(1, 200, (2, 10))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))["params"]
  full = np.asarray(generate.make_generate(model, 8, eos_id=-1)(params, batch)["tokens"])
  eos = int(full[0, 2])  # row 0 ends at its third token
  end = int(np.argmax(full[0] == eos))
  valid = np.array([True, False])  # row 1 stands for a padding row: it does not hold on
  out = jax.jit(generate.make_generate(model, 8, eos_id=eos))(params, batch, valid)
  assert int(out["steps"]) == end < 8
  tokens = np.asarray(out["tokens"])
  np.testing.assert_array_equal(tokens[0, :end + 1], full[0, :end + 1])
  assert (tokens[:, end + 1:] == eos).all() and (tokens[1, end:] == eos).all()
  # All rows valid: greedy output is the full-length output cut at each row's end.
  out = np.asarray(generate.make_generate(model, 8, eos_id=eos)(params, batch)["tokens"])
  for row in range(2):
    ends = np.flatnonzero(full[row] == eos)
    stop = int(ends[0]) if len(ends) else 8
    np.testing.assert_array_equal(out[row, :stop], full[row, :stop])
    assert (out[row, stop:] == eos).all()


def test_held_out_accuracy_reaches_tensorboard(stage3_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stage3_run.workdir, workdir)
  config = stage3_run.config
  setup = loop.TrainSetup(config, stage3_run.mesh)
  result = runner.evaluate(config, workdir, params=stage3_run.state.params, setup=setup,
                           verbose=False)
  def scalars(run=""):
    found = {}
    for kind, step, tag, value in test_resume._scalar_events(workdir, run):  # pylint: disable=protected-access
      if kind == "scalar":
        found.setdefault(tag, {})[step] = value
    return found
  assert "loss" in scalars()  # the training curves, beside the eval run
  for qtype, accuracy in result["accuracy"].items():
    assert scalars("eval")[f"eval/accuracy/{qtype}"] == {4: pytest.approx(accuracy)}
  # A later start rebuilds the training events from metrics.jsonl; the eval run stays.
  metrics_lib.MetricsWriter(workdir).close()
  assert "loss" in scalars() and "eval/accuracy/color" in scalars("eval")
