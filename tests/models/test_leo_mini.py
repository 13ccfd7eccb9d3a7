"""LeoMini: placeholder placement, shapes per reducer, text-only rows beside image rows."""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.models import llama
from leo_mini_jax.training import loop

LENGTH = 10


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 256, (3, LENGTH)).astype(np.int32)
  ids[0, 2] = IMAGE_PLACEHOLDER_ID  # image row, placeholder inside
  ids[1, 0] = IMAGE_PLACEHOLDER_ID  # image row, placeholder first
  attention = np.ones((3, LENGTH), np.int32)
  attention[1, 7:] = 0  # padding
  attention[2, 6:] = 0  # text-only row, padded
  loss = np.zeros((3, LENGTH), np.int32)
  loss[:, 5:7] = 1
  instruction = np.zeros((3, LENGTH), np.int32)
  instruction[:, 3:5] = 1
  images = rng.integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
  images[2] = 0
  return dict(input_ids=ids, attention_mask=attention, loss_mask=loss * attention,
              instruction_mask=instruction, image=images,
              has_image=np.array([True, True, False]))


def test_assemble_sequence_places_visual_tokens_at_the_placeholder():
  batch = _batch()
  dim, num_visual = 2, 3
  # Text embedding of a token = its id; visual token j of row b = -(10 b + j + 1).
  text = jnp.asarray(np.repeat(batch["input_ids"][..., None], dim, -1), jnp.float32)
  visual = -(10 * np.arange(3)[:, None] + np.arange(num_visual)[None] + 1.0)
  visual = jnp.asarray(np.repeat(visual[..., None], dim, -1), jnp.float32)
  out = jax.tree.map(np.asarray, leo_mini_lib.assemble_sequence(text, visual, batch))
  ids = batch["input_ids"]
  emb = out["inputs_embeds"][..., 0]
  assert emb.shape == (3, LENGTH + num_visual - 1)
  # Row 0: text[0:2], visual x3, text[3:10].
  np.testing.assert_array_equal(emb[0], np.concatenate([ids[0, :2], [-1, -2, -3], ids[0, 3:]]))
  # Row 1: visual first, then text[1:7], then padding.
  np.testing.assert_array_equal(emb[1, :9], np.concatenate([[-11, -12, -13], ids[1, 1:7]]))
  np.testing.assert_array_equal(out["attention_mask"][1], [1] * 9 + [0] * 3)
  # Row 2 (text-only): unchanged text, then padding slots.
  np.testing.assert_array_equal(emb[2, :6], ids[2, :6])
  np.testing.assert_array_equal(out["attention_mask"][2], [1] * 6 + [0] * 6)
  # Targets are next tokens; supervised where the *next* token carries the loss mask.
  np.testing.assert_array_equal(out["targets"][0, 6:10], ids[0, 5:9])
  np.testing.assert_array_equal(np.nonzero(out["target_mask"][0])[0], [6, 7])
  np.testing.assert_array_equal(np.nonzero(out["target_mask"][1])[0], [6, 7])
  np.testing.assert_array_equal(np.nonzero(out["target_mask"][2])[0], [4])  # 6 is padding
  assert not out["target_mask"][out["is_visual"]].any()


def _model(arg):
  cfg = leo_mini_lib.LeoMiniConfig.from_config(tiny.get_config(arg).model)
  model = leo_mini_lib.LeoMini(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), _batch()))["params"]
  return cfg, model, params


@pytest.mark.parametrize("arg,num_visual", [
    ("stage=1", 16), ("stage=3,tokens=1", 1), ("stage=3,tokens=16", 16),
    ("stage=3,tokens=4,reducer=mqt", 4), ("stage=3,tokens=4,router=hidden", 4)])
def test_output_shapes_for_every_reducer(arg, num_visual):
  cfg, model, params = _model(arg)
  logits, aux = jax.jit(model.apply)({"params": params}, _batch())
  assert aux["num_visual_tokens"] == num_visual
  assert logits.shape == (3, LENGTH + num_visual - 1, cfg.llm.vocab_size)
  assert aux["targets"].shape == logits.shape[:2]
  assert np.all(np.isfinite(np.asarray(logits)))
  if cfg.llm.mmoe.enabled:
    assert aux["routing"]["top_expert"].shape == (cfg.llm.num_layers,) + logits.shape[:2]
    assert float(aux["balance_loss"]) > 0
  else:
    assert float(aux["balance_loss"]) == 0.0


def test_text_only_row_matches_the_plain_llm():
  _, model, params = _model("stage=1")
  batch = _batch()
  logits, _ = model.apply({"params": params}, batch)
  llm = llama.LlamaForCausalLM(model.config.llm)
  alone = llm.apply({"params": params["llm"]}, batch["input_ids"][2:, :6])
  np.testing.assert_allclose(np.asarray(logits[2, :6]), np.asarray(alone[0]), atol=1e-5)


def test_image_changes_only_image_rows():
  _, model, params = _model("stage=3,tokens=4")
  batch = _batch()
  forward = jax.jit(model.apply)
  logits, _ = forward({"params": params}, batch)
  changed = dict(batch, image=255 - batch["image"])
  changed["image"][2] = 0
  logits2, _ = forward({"params": params}, changed)
  diff = np.abs(np.asarray(logits2) - np.asarray(logits)).max(axis=(1, 2))
  assert diff[0] > 1e-4 and diff[1] > 1e-4
  assert diff[2] < 1e-6


def test_prefill_and_decode_match_the_full_forward():
  _, model, params = _model("stage=3,tokens=4")
  batch = _batch()
  logits, aux = model.apply({"params": params}, batch)
  lengths = np.asarray(aux["attention_mask"]).sum(1)
  next_logits, cache, _ = model.apply({"params": params}, batch, 20, method=model.prefill)
  np.testing.assert_allclose(np.asarray(next_logits),
                             np.asarray(logits)[np.arange(3), lengths - 1], atol=1e-5)
  step_logits, cache, _ = model.apply({"params": params}, jnp.array([5, 6, 7]), cache,
                                      method=model.decode_step)
  assert step_logits.shape == (3, model.config.llm.vocab_size)
  np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths + 1)


def test_unknown_model_field_is_named():
  config = tiny.get_config("stage=3").model
  config["reducers"] = {}
  with pytest.raises(ValueError, match="reducers"):
    leo_mini_lib.LeoMiniConfig.from_config(config)


@pytest.mark.parametrize("arg", ["stage=3,tokens=4", "stage=3,tokens=4,reducer=mqt"])
def test_every_parameter_has_logical_axis_names(arg):
  cfg = leo_mini_lib.LeoMiniConfig.from_config(tiny.get_config(arg).model)
  model = leo_mini_lib.LeoMini(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), _batch())["params"]
  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
  assert not unnamed
  assert all(len(x.names) == x.value.ndim for x in leaves)


def test_balance_loss_sum_over_layers_is_layers_times_the_mean():
  """mmoe.balance_reduce: λ × mean over layers (default) or λ × sum (Switch/GShard)."""
  config = tiny.get_config("stage=3,tokens=4").model
  assert config.llm.mmoe.balance_reduce == "mean"
  losses = {}
  for reduce in ("mean", "sum"):
    config.llm.mmoe.balance_reduce = reduce
    model = leo_mini_lib.LeoMini(leo_mini_lib.LeoMiniConfig.from_config(config))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), _batch()))["params"]
    losses[reduce] = float(model.apply({"params": params}, _batch())[1]["balance_loss"])
  layers = config.llm.num_layers
  assert layers > 1 and losses["mean"] > 0
  np.testing.assert_allclose(losses["sum"], layers * losses["mean"], rtol=1e-5)
  config.llm.mmoe.balance_reduce = "max"
  with pytest.raises(ValueError, match="mmoe.balance_reduce"):
    leo_mini_lib.LeoMiniConfig.from_config(config)


def test_max_llm_length_cuts_the_training_sequence_to_max_length():
  # data.max_length_counts_visual_tokens: rows were fitted to L text + visual tokens, so
  # the forward's LLM sequence is L long (not L + N^V − 1) and only padding is cut.
  cfg, model, params = _model("stage=3,tokens=4")
  batch = _batch()
  batch["attention_mask"][0, LENGTH - 3:] = 0  # image row 0 fitted to L − (4 − 1) tokens
  batch["loss_mask"] *= batch["attention_mask"]
  full_logits, full_aux = model.apply({"params": params}, batch)
  capped = leo_mini_lib.LeoMini(dataclasses.replace(cfg, max_llm_length=LENGTH))
  assert capped.training_sequence_length(LENGTH) == LENGTH
  assert capped.sequence_length(LENGTH) == LENGTH + 3  # prefill is never cut
  logits, aux = capped.apply({"params": params}, batch)
  assert logits.shape == (3, LENGTH, cfg.llm.vocab_size)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits)[:, :LENGTH],
                             atol=1e-5)
  # Every supervised target and every real token survives the cut.
  assert int(aux["target_mask"].sum()) == int(full_aux["target_mask"].sum())
  assert int(aux["attention_mask"].sum()) == int(full_aux["attention_mask"].sum())


def test_build_model_takes_the_length_limit_from_the_data_config():
  config = tiny.get_config("stage=3,tokens=4")
  assert loop.build_model(config).config.max_llm_length == 0
  config.data.max_length_counts_visual_tokens = True
  assert loop.build_model(config).config.max_llm_length == config.data.max_length
