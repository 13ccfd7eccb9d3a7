"""Length-bucketed, data-parallel generation: 4 fake devices give the single-device output."""

import jax
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.data import conversation, images, tokenizers
from leo_mini_jax.evaluation import generate
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop


@pytest.mark.parametrize("length,bucket", [(1, 16), (16, 16), (17, 24), (25, 32),
                                           (33, 48), (96, 96), (100, 128), (1500, 1536)])
def test_bucket_length(length, bucket):
  assert generate.bucket_length(length) == bucket


def _prompts(count):
  tokenizer = tokenizers.load_tokenizer("byte")
  template = conversation.get_template("vicuna_v1", "")
  rng = np.random.default_rng(0)
  # 28-32 tokens with the template: one bucket (32), so each layout compiles once.
  questions = ["what colour?", "which shape?", "count them", "where is it?", "is it big?"]
  prompts = []
  for i in range(count):
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) if i % 4 else None
    tokens = generate.build_prompt(questions[i % 5], tokenizer, template,
                                   image is not None)
    prompts.append(generate.Prompt(tokens, image))
  return prompts, tokenizer, template


def test_four_devices_match_one_and_batching_changes_nothing():
  config = tiny.get_config("stage=3,tokens=4")
  config.data.max_length = 64
  prompts, tokenizer, template = _prompts(7)
  load = lambda source: images.to_master_resolution(source, config.data.resolution)
  results, params = {}, None
  for devices, batch_size in ((1, 1), (1, 4), (4, 4)):
    mesh = mesh_lib.make_mesh(dict(data=devices, fsdp=1, tensor=1),
                              devices=jax.devices()[:devices])
    setup = loop.TrainSetup(config, mesh)
    # Initialised once and placed on each mesh: the same weights everywhere, and no
    # train-state init compiled per mesh.
    params = (setup.init_state(0).params if params is None
              else jax.device_put(jax.device_get(params), setup.state_shardings.params))
    generator = generate.BatchGenerator(setup, max_new_tokens=3,
                                        eos_id=template.end_of_turn_id(tokenizer))
    out = generator(params, prompts, batch_size=batch_size,
                    resolution=config.data.resolution, load_image=load,
                    pad_id=tokenizer.pad_id)
    assert not out.failed
    results[(devices, batch_size)] = out
  reference = results[(1, 1)]
  for key in ((1, 4), (4, 4)):
    np.testing.assert_array_equal(np.stack(results[key].tokens), np.stack(reference.tokens),
                                  err_msg=str(key))
    np.testing.assert_allclose(results[key].routing, reference.routing)
  # Every real prompt token is routed once per layer, padding rows and slots never.
  visual = setup.model.config.num_visual_tokens
  tokens = sum(len(p.tokens) + (visual - 1 if p.image is not None else 0) for p in prompts)
  np.testing.assert_allclose(reference.routing.sum(-1), tokens)


def test_a_prompt_longer_than_the_context_is_an_error_naming_it():
  config = tiny.get_config("stage=3,tokens=4")
  config.model.llm.max_position_embeddings = 32
  setup = loop.TrainSetup(config, mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  prompts, tokenizer, template = _prompts(3)
  generator = generate.BatchGenerator(setup, max_new_tokens=2, eos_id=1)
  with pytest.raises(ValueError, match=r"GQA: record \d: prompt of \d+ tokens \(\d+ with the "
                                       "visual tokens\) exceeds the model's context of 32"):
    generator(None, prompts, batch_size=1, resolution=64, load_image=None,
              names=["GQA: record 0", "GQA: record 1", "GQA: record 2"])


def test_each_answer_length_has_its_program_and_progress_counts_questions():
  config = tiny.get_config("stage=3,tokens=4")
  config.data.max_length = 64
  setup = loop.TrainSetup(config, mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  params = setup.init_state(0).params
  prompts, tokenizer, template = _prompts(5)
  load = lambda source: images.to_master_resolution(source, config.data.resolution)
  generator = generate.BatchGenerator(setup, max_new_tokens=3, eos_id=-1)  # never stops
  seen = []
  kwargs = dict(batch_size=2, resolution=config.data.resolution, load_image=load,
                pad_id=tokenizer.pad_id)
  short = generator(params, prompts, progress=lambda *a: seen.append(a), **kwargs)
  long = generator(params, prompts, max_new_tokens=6, **kwargs)
  again = generator(params, prompts, max_new_tokens=6, **kwargs)
  assert seen == [(2, 5), (4, 5), (5, 5)]
  assert {t.shape for t in short.tokens} == {(3,)} and {t.shape for t in long.tokens} == {(6,)}
  assert sorted(generator.programs) == [3, 6]  # one program per distinct length
  # Greedy: the longer answer starts with the shorter one.
  np.testing.assert_array_equal(np.stack(long.tokens)[:, :3], np.stack(short.tokens))
  np.testing.assert_array_equal(np.stack(again.tokens), np.stack(long.tokens))
