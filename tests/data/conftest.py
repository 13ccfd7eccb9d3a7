"""Tiny tokenizers built in the test session (no downloads)."""

import json
import os

import pytest

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What color is the shape? ASSISTANT: red",
    "USER: What shape is shown? ASSISTANT: circle",
    "How many shapes are there?\n3\nWhere is the blue shape?\nleft",
    "What word is written? cat dog sun car hat box cup pen bus map",
    "You are a helpful language and vision assistant.",
    "green blue yellow purple orange square triangle diamond cross top bottom right",
] * 4

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def llama3_style_folder(tmp_path_factory):
  """Byte-level BPE tokenizer.json with Llama-3 chat specials + tokenizer_config.json."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  folder = tmp_path_factory.mktemp("llama3_tok")
  tok.save(str(folder / "tokenizer.json"))
  with open(folder / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
  return str(folder)


@pytest.fixture(scope="session")
def metaspace_folder(tmp_path_factory):
  """Llama-2-style tokenizer.json: BPE over a Metaspace pre-tokenizer (prefix space)."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
  tok.train_from_iterator(CORPUS, trainer)
  folder = tmp_path_factory.mktemp("metaspace_tok")
  tok.save(str(folder / "tokenizer.json"))
  return str(folder)


@pytest.fixture(scope="session")
def sentencepiece_folder(tmp_path_factory):
  """Llama-2-style sentencepiece model: BPE, byte fallback, whitespace kept."""
  spm = pytest.importorskip("sentencepiece")
  folder = tmp_path_factory.mktemp("sp_tok")
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(CORPUS))
  spm.SentencePieceTrainer.Train(
      input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=420,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, bos_id=1, eos_id=2,
      unk_id=0, pad_id=-1, minloglevel=2)
  assert os.path.isfile(folder / "tokenizer.model")
  os.remove(corpus)
  return str(folder)
