"""The grain pipeline: batch contract, checkpointable iterator, process sharding."""

import json

import numpy as np
import pytest

from leo_mini_jax.data import conversation as conv
from leo_mini_jax.data import pipeline
from leo_mini_jax.data import synthetic
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.data import validation

R = 32
L = 64


def config(**overrides):
  cfg = pipeline.default_data_config()
  cfg.update(resolution=R, max_length=L, system_prompt="", num_train=12, num_eval=7,
             batch_size=4, read_threads=1, prefetch_batches=2)
  cfg.update(**overrides)
  return cfg


def build(cfg, split="train", index=0, count=1, **kwargs):
  return pipeline.make_dataset(cfg, split=split, process_index=index, process_count=count,
                               **kwargs)


def image_ids(split, num, seed=0):
  """image bytes → example id (synthetic images are unique in these tiny splits)."""
  source = synthetic.SyntheticVQA(split, num, R, seed)
  table = {source[i]["image"].tobytes(): source[i]["id"] for i in range(num)}
  assert len(table) == num
  return table


def row_ids(batch, table):
  return [table.get(image.tobytes(), "unknown image") for image in batch["image"]]


def test_train_batch_contract():
  data = build(config())
  batch = next(iter(data))
  tok = tokenizers_lib.ByteTokenizer()
  expected = {"input_ids": (np.int32, (4, L)), "attention_mask": (np.int32, (4, L)),
              "loss_mask": (np.int32, (4, L)), "instruction_mask": (np.int32, (4, L)),
              "image": (np.uint8, (4, R, R, 3)), "has_image": (np.bool_, (4,))}
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
  lengths = batch["attention_mask"].sum(1)
  for row in range(4):
    n = lengths[row]
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(L) < n)
    assert (batch["input_ids"][row, n:] == tok.pad_id).all()
    assert not batch["loss_mask"][row, n:].any()
    assert not batch["instruction_mask"][row, n:].any()
    assert (batch["input_ids"][row] == conv.IMAGE_PLACEHOLDER_ID).sum() == 1
    learned = batch["input_ids"][row][batch["loss_mask"][row] == 1]
    assert learned[-1] == tok.eos_id  # the answer's end-of-turn token is learned
    possible = {gpt for _, gpt in synthetic.all_turn_texts()}
    assert tok.decode(learned[:-1]).strip() in possible
    instruction = tok.decode(batch["input_ids"][row][batch["instruction_mask"][row] == 1])
    assert instruction.strip() in {h.split("\n", 1)[1] for h, _ in
                                   synthetic.all_turn_texts()}
  assert batch["has_image"].all()
  assert data.num_batches is None and data.local_batch_size == 4


def test_generate_mode_prompts_and_metadata():
  cfg = config()
  data = build(cfg, split="eval")
  assert data.mode == "generate" and data.num_batches == 2
  source = synthetic.SyntheticVQA("eval", 7, R)
  tok = tokenizers_lib.ByteTokenizer()
  seen = []
  for batch, meta in data:
    assert not batch["loss_mask"].any()
    for row, example_id in enumerate(meta["id"]):
      if not meta["valid"][row]:
        assert example_id == "" and batch["attention_mask"][row].sum() == 1
        continue
      index = int(example_id.rsplit("-", 1)[1])
      ex = source[index]
      n = batch["attention_mask"][row].sum()
      text = tok.decode(batch["input_ids"][row][:n])
      assert text == "USER: \n" + ex["conversations"][0]["value"].split("\n", 1)[1] + \
          " ASSISTANT:"
      assert meta["answer"][row] == ex["answer"]
      assert meta["question_type"][row] == ex["question_type"]
      np.testing.assert_array_equal(batch["image"][row], ex["image"])
      seen.append(example_id)
  assert seen == [source[i]["id"] for i in range(7)]


def test_iterator_state_restores_the_same_sequence():
  cfg = config()
  it = build(cfg).iterator()
  for _ in range(3):
    next(it)
  state = it.get_state()
  json.dumps(state)  # orbax's grain handler stores it as JSON
  reference = [next(it) for _ in range(5)]
  resumed = build(cfg).iterator()
  resumed.set_state(state)
  for expected in reference:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # A fresh iterator starts over (so the restore above really moved it).
  first = next(build(cfg).iterator())
  assert any(not np.array_equal(first["image"], r["image"]) for r in reference[:1])


def test_orbax_saves_the_iterator_beside_other_state(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  cfg = config()
  it = build(cfg).iterator()
  next(it)
  with ocp.CheckpointManager(
      tmp_path, item_handlers={"iter": grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(1, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = next(it)
  resumed = build(cfg).iterator()
  with ocp.CheckpointManager(
      tmp_path, item_handlers={"iter": grain.checkpoint.CheckpointHandler()}) as manager:
    manager.restore(1, args=ocp.args.Composite(
        iter=grain.checkpoint.CheckpointRestore(resumed)))
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_train_shards_are_disjoint_and_cover_each_epoch():
  cfg = config(batch_size=4)  # 2 rows per process
  table = image_ids("train", 12)
  iterators = [build(cfg, index=p, count=2).iterator() for p in range(2)]
  epochs = []
  for _ in range(2):
    per_process = [sum((row_ids(next(it), table) for _ in range(3)), [])
                   for it in iterators]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == sorted(table.values())
    epochs.append(per_process)
  assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_shuffle_follows_the_seed():
  table = image_ids("train", 12)
  order = lambda seed: sum((row_ids(b, table) for b, _ in zip(build(config(), seed=seed),
                                                                range(3))), [])
  assert order(5) == order(5)
  assert order(5) != order(6)


def test_eval_shards_are_disjoint_cover_and_have_equal_lengths():
  cfg = config(batch_size=4)
  shards = [list(build(cfg, split="eval", index=p, count=2, mode="eval")) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 2
  ids = [[i for _, meta in shard for i, v in zip(meta["id"], meta["valid"]) if v]
         for shard in shards]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == [f"synthetic-eval-0-{i:07d}" for i in range(7)]
  padding = sum(int((~meta["valid"]).sum()) for shard in shards for _, meta in shard)
  assert padding == 1
  for shard in shards:  # teacher-forced eval rows carry their answers
    for batch, meta in shard:
      assert (batch["loss_mask"].sum(1) > 0).tolist() == meta["valid"].tolist()


def test_plain_template_uses_captions():
  data = build(config(template="plain"), split="eval", mode="eval")
  batch, meta = next(iter(data))
  source = synthetic.SyntheticVQA("eval", 7, R, style="caption")
  tok = tokenizers_lib.ByteTokenizer()
  answer = tok.decode(batch["input_ids"][0][batch["loss_mask"][0] == 1])
  # The caption and the plain template's closing "\n" (LLaVA's preprocess_plain) are learned.
  assert answer == source[0]["caption"] + "\n" == meta["answer"][0] + "\n"
  assert not batch["instruction_mask"].any()
  prompts, meta = next(iter(build(config(template="plain"), split="eval")))
  n = prompts["attention_mask"][0].sum()
  assert prompts["input_ids"][0, :n].tolist() == [tok.bos_id, conv.IMAGE_PLACEHOLDER_ID]
  assert meta["answer"][0] == source[0]["caption"]


def test_config_errors_are_named():
  with pytest.raises(ValueError, match="batch_size=5 is not divisible"):
    build(config(batch_size=5), count=2)
  with pytest.raises(ValueError, match="data.kind"):
    build(config(kind="webdataset"))
  with pytest.raises(ValueError, match="max_length=20"):
    build(config(max_length=20))
  with pytest.raises(ValueError, match="mode"):
    build(config(), mode="predict")


def test_worker_processes_give_the_same_batches():
  cfg = config()
  reference = [b for b, _ in zip(build(cfg), range(3))]
  workers = build(config(num_workers=1))
  it = workers.iterator()
  try:
    for expected in reference:
      got = next(it)
      np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
      np.testing.assert_array_equal(got["image"], expected["image"])
    json.dumps(it.get_state())
  finally:  # the worker process and its shared memory end here, not at a later GC
    it.close()


def _long_record(has_image):
  words = " ".join(f"w{i}" for i in range(40))
  turns = [{"from": "human", "value": ("<image>\n" if has_image else "") + "Describe."},
           {"from": "gpt", "value": words}]
  return turns


@pytest.mark.parametrize("has_image,kept", [(True, 40 - 8), (False, 40)])
def test_max_length_can_bound_text_plus_visual_tokens(has_image, kept):
  # EAGLE/LLaVA cut the sequence *with* its visual tokens to model_max_length: an image
  # row of N^V = 9 visual tokens keeps max_length − 8 text tokens (the placeholder is one
  # of them); a text-only row keeps max_length.
  tok = tokenizers_lib.ByteTokenizer()
  template = conv.get_template("vicuna_v1", "")
  args = (_long_record(has_image), has_image, tok, template, 40, "truncate")
  counted, truncated = conv.tokenize_record(*args, visual_tokens=9)
  assert truncated and len(counted) == kept
  assert len(conv.tokenize_record(*args)[0]) == 40  # text only: the old count
  full = conv.tokenize_full(args[0], has_image, tok, template)
  check = validation.LengthCheck(tok, template, 40, visual_tokens=9)
  # The report's length is what max_length is compared with (the one that keeps it whole).
  result = validation.check_conversation({"conversations": args[0]}, has_image, check)
  assert result.truncated and result.length == len(full) + (8 if has_image else 0)


def test_counting_visual_tokens_fits_every_image_row_and_needs_their_number():
  cfg = config(max_length_counts_visual_tokens=True)
  with pytest.raises(ValueError, match="max_length_counts_visual_tokens"):
    build(cfg)
  with pytest.raises(ValueError, match="do not fit data.max_length"):
    build(cfg, num_visual_tokens=L - 8)  # synthetic rows are longer than 8 tokens
  batch = next(iter(build(cfg, num_visual_tokens=8)))
  assert batch["input_ids"].shape == (4, L)
  assert (batch["attention_mask"].sum(1) <= L - 7).all()
  assert pipeline.llm_length_limit(cfg) == L and pipeline.llm_length_limit(config()) == 0
  # Generation prompts are never cut by the model, so they count the placeholder as one.
  assert pipeline.counted_visual_tokens(cfg, "generate", None) == 1
