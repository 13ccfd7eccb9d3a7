"""CoTR and the MMoE router see the first question only: answer 1 does not depend on
question 2 (information from the future of the sequence, absent at evaluation)."""

import jax
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.data import conversation as conv
from leo_mini_jax.data import pipeline
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.models import leo_mini

R = 64


def _record(question2):
  image = np.random.default_rng(0).integers(0, 256, (R, R, 3), dtype=np.uint8)
  return {"id": "r", "image": image, "conversations": [
      {"from": "human", "value": "<image>\nWhat colour is it?"},
      {"from": "gpt", "value": "red"},
      {"from": "human", "value": question2},
      {"from": "gpt", "value": "yes"}]}


def _batch(instruction_turns):
  tok = tokenizers_lib.ByteTokenizer()
  encoder = pipeline.ExampleEncoder(
      tok, conv.get_template("vicuna_v1", ""), 96, "truncate", R, (122, 116, 104),
      prompt_only=False, instruction_turns=instruction_turns)
  rows = [encoder(_record(q))[0] for q in ("Is it round?", "Is the square on the left?")]
  return pipeline.collate(rows)


@pytest.fixture(scope="module")
def model_and_params():
  model_cfg = tiny.get_model_config(3, 4, "cotr", "multimodal")
  model_cfg["experts"] = model_cfg["experts"][:1]  # CLIP only: keeps the test small
  cfg = leo_mini.LeoMiniConfig.from_config(model_cfg)
  model = leo_mini.LeoMini(cfg)
  batch = _batch("first")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  # LoRA B starts at zero (routing would not show in the logits): perturb everything.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(treedef, leaves)


def _answer1_logits_change(model, params, instruction_turns):
  batch = _batch(instruction_turns)
  logits, _ = jax.jit(model.apply)({"params": params}, batch)
  logits = np.asarray(logits)
  loss = batch["loss_mask"][0]
  first_answer_end = int(np.flatnonzero(np.diff(loss) == -1)[0])  # last token of answer 1
  # Text position t sits at t + N^V - 1 after the visual tokens replace the placeholder.
  end = first_answer_end + model.config.num_visual_tokens - 1
  np.testing.assert_array_equal(batch["input_ids"][0, :first_answer_end + 1],
                                batch["input_ids"][1, :first_answer_end + 1])
  return np.abs(logits[0, :end + 1] - logits[1, :end + 1]).max()


@pytest.mark.slow  # compiles a tiny LEO-MINI forward (~30 s of CPU)
def test_answer1_logits_do_not_depend_on_question2(model_and_params):
  model, params = model_and_params
  assert _answer1_logits_change(model, params, "first") < 1e-5


@pytest.mark.slow
def test_all_turns_conditions_on_later_questions(model_and_params):
  """The opt-in old behaviour does leak question 2 (so the test above can fail)."""
  model, params = model_and_params
  assert _answer1_logits_change(model, params, "all") > 1e-3
