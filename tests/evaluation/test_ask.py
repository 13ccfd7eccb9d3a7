"""The ask CLI on a tiny model trained for a few steps: answers, visual tokens, routing,
multi-turn conversations, sampling, params-only checkpoints and one-line errors."""

import io
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax.evaluation import ask
from leo_mini_jax.evaluation import generate as generate_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/tiny.py:stage=3,experts=clip"  # the stage3_run model


@pytest.fixture
def run_dir(stage3_run):
  """The session's tiny stage-3 run (tests/conftest.py): a real workdir to answer from."""
  return stage3_run.workdir


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("images") / "red_square.png"
  pixels = np.full((40, 72, 3), (122, 116, 104), np.uint8)  # not square: gets padded
  pixels[8:32, 20:44] = (220, 30, 30)
  Image.fromarray(pixels).save(path)
  return str(path)


def _cli(*args, stdin=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device
  return subprocess.run([sys.executable, "-m", "leo_mini_jax.evaluation.ask",
                         f"--config={CONFIG}", *args], cwd=ROOT, env=env, input=stdin,
                        capture_output=True, text=True, timeout=600)


def _blocks(text):
  """[(answer, visual tokens, {layer: [expert ids]})] of the printed replies."""
  blocks = []
  for chunk in text.split("answer: ")[1:]:
    lines = chunk.splitlines()
    visual = int(re.search(r"visual tokens: (\d+)", chunk).group(1))
    layers = {int(m.group(1)): [int(e) for e in m.group(2).split()]
              for m in re.finditer(r"layer +(\d+): .*\| ?([\d ]*)$", chunk, re.M)}
    blocks.append((lines[0], visual, layers))
  return blocks


def test_one_question_prints_answer_visual_tokens_and_routing(run_dir, image_path):
  out = io.StringIO()
  ask.run(tiny.get_config("stage=3,experts=clip"), run_dir, image_path,
          "What colour is the shape?", out=out)
  text = out.getvalue()
  [(answer, visual, layers)] = _blocks(text)
  assert visual == 4
  n = int(re.search(r"routing of the (\d+) answer tokens", text).group(1))
  assert sorted(layers) == [0, 1]  # the tiny LLM's two MMoE-LLM layers
  for experts in layers.values():
    assert len(experts) == n and all(0 <= e < 3 for e in experts)
  shares = re.findall(r"e0=(\d+)% e1=(\d+)% e2=(\d+)%", text)
  assert len(shares) == 2
  if n:
    assert all(abs(sum(map(int, s)) - 100) <= 2 for s in shares)
  assert answer == answer.strip()


@pytest.mark.slow
def test_interactive_conversation_from_stdin(run_dir, image_path):
  result = _cli(f"--workdir={run_dir}", f"--image={image_path}",
                stdin="What colour is the shape?\nAnd its shape?\n\nignored\n")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("USER: ") == 2 and "ignored" not in result.stdout
  blocks = _blocks(result.stdout)
  assert len(blocks) == 2 and all(visual == 4 for _, visual, _ in blocks)


def test_second_turn_prompt_holds_the_first_exchange(run_dir, image_path, monkeypatch):
  config = tiny.get_config("stage=3,experts=clip")
  assistant = ask.Assistant(config, run_dir)
  tokenizer = assistant.tokenizer
  prompts = []

  def fake_generate(params, batch, key):
    del params, key
    prompts.append(np.asarray(batch["input_ids"][0]))
    ids = tokenizer.encode(" red") + [tokenizer.eos_id]
    layers = assistant.model.config.llm.num_layers
    return {"tokens": jnp.asarray([ids + [tokenizer.eos_id] * (12 - len(ids))]),
            "top_expert": jnp.zeros((layers, 1, 12), jnp.int32)}

  monkeypatch.setattr(assistant, "_generate", fake_generate)
  assistant.reset(ask.load_image(image_path, config.data))
  assert assistant.ask("What colour is the shape?").answer == "red"
  assert assistant.ask("Is it large?").answer == "red"
  assert [t["from"] for t in assistant.turns] == ["human", "gpt", "human", "gpt"]
  second = tokenizer.decode([t for t in prompts[1].tolist() if t >= 0])
  assert "What colour is the shape? ASSISTANT: red" in second
  assert second.rstrip().endswith("USER: Is it large? ASSISTANT:")
  assert int(np.sum(prompts[1] == -200)) == 1  # the image once, in the first turn


@pytest.mark.slow
def test_params_only_checkpoint_gives_the_same_answer(run_dir, image_path, tmp_path):
  config = tiny.get_config("stage=3,experts=clip")
  from_run = ask.Assistant(config, run_dir)
  params_dir = str(tmp_path / "params")  # the format porting.convert writes
  checkpoints_lib.save_params(params_dir, from_run.params)
  from_params = ask.Assistant(config, params_dir)
  image = ask.load_image(image_path, config.data)
  replies = []
  for assistant in (from_run, from_params):
    assistant.reset(image)
    replies.append(assistant.ask("What shape is it?"))
  assert replies[0].answer_ids == replies[1].answer_ids
  np.testing.assert_array_equal(replies[0].routing, replies[1].routing)


def test_sampling_at_zero_temperature_is_greedy_generation(run_dir):
  config = tiny.get_config("stage=3,experts=clip")
  assistant = ask.Assistant(config, run_dir, max_new_tokens=5)
  assistant.reset(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
  batch = assistant._batch([1, -200, 85, 83, 69, 82, 58], [0, 0, 1, 1, 1, 1, 0])
  eos = assistant.template.end_of_turn_id(assistant.tokenizer)
  greedy = generate_lib.make_generate(assistant.model, 5, eos)(assistant.params, batch)
  sampled = ask.make_sampling_generate(assistant.model, 5, eos, 0.0, 1.0)(
      assistant.params, batch, jax.random.PRNGKey(3))
  assert greedy.keys() == sampled.keys() == {"tokens", "steps", "top_expert", "prompt_counts"}
  for key in greedy:
    np.testing.assert_array_equal(greedy[key], sampled[key])


def test_sample_token_temperature_and_top_p():
  logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = jax.jit(jax.vmap(lambda k, t, p: ask.sample_token(logits, k, t, p)[0],
                          in_axes=(0, None, None)), static_argnums=(1, 2))
  assert set(np.asarray(draw(keys, 1.0, 0.5)).tolist()) == {0}
  assert set(np.asarray(draw(keys, 1.0, 0.8)).tolist()) == {0, 1}
  counts = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=3) / 400
  np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.07)
  assert int(ask.sample_token(logits, keys[0], 0.0)[0]) == 0


@pytest.mark.parametrize("image,workdir,message", [
    # The image is checked first, so these need no checkpoint.
    ("corrupt.png", "empty_dir", "cannot decode image"),
    ("missing.png", "empty_dir", "image not found"),
    ("red_square.png", "missing_run", "checkpoint not found"),
    ("red_square.png", "empty_dir", "is not a run workdir or a params checkpoint"),
])
def test_errors_are_one_line_naming_the_file(image_path, tmp_path, image, workdir, message):
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "empty_dir").mkdir()
  image = image_path if image == "red_square.png" else str(tmp_path / image)
  workdir = str(tmp_path / workdir)
  result = _cli(f"--workdir={workdir}", f"--image={image}", "--question=hi")
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.startswith("ask: ")]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert (image if "image" in message else workdir) in lines[0]
  assert "Traceback" not in result.stderr


def test_without_config_the_run_supplies_its_own(run_dir, image_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "leo_mini_jax.evaluation.ask",
                           f"--workdir={run_dir}", f"--image={image_path}",
                           "--question=What colour is the shape?"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  [(_, visual, layers)] = _blocks(result.stdout)
  assert visual == 4 and sorted(layers) == [0, 1]


def test_a_config_with_another_tokenizer_is_refused(run_dir, image_path, tmp_path):
  # Decoding the run's ids with another tokenizer prints garbage: refuse instead.
  tokenizer = tmp_path / "tokenizer.json"
  tokenizer.write_text('{"model": {"type": "BPE"}}')
  config = tiny.get_config("stage=3,experts=clip")
  config.data.tokenizer = str(tokenizer)
  with pytest.raises(ask.cli.UserError, match=r"data.tokenizer: the run was trained with "
                     r"byte .*the config gives .*tokenizer.json"):
    ask.run(config, run_dir, image_path, "What colour is the shape?", out=io.StringIO())
