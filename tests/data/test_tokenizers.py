"""Tokenizers: byte round trip, tiny HF / sentencepiece tokenizers, folder loading."""

import json
import os
import pickle

import pytest

from leo_mini_jax.data import tokenizers as tokenizers_lib

TEXTS = ["hello world", " red", "\nWhat color is the shape?", "USER:", "héllo ✓ 3",
         "A chat between a curious user"]


def test_byte_tokenizer_round_trip_and_ids():
  tok = tokenizers_lib.ByteTokenizer()
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert tok.vocab_size <= 320
  specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.special_id("<|eot_id|>"),
              tok.special_id("<|start_header_id|>"), tok.special_id("<|end_header_id|>")}
  assert len(specials) == 6 and min(specials) >= 256 and max(specials) < tok.vocab_size
  assert tok.special_id("<|begin_of_text|>") == tok.bos_id
  assert tok.special_id("</s>") == tok.eos_id
  assert tok.token_id("<nope>") is None
  with pytest.raises(KeyError, match="<nope>"):
    tok.special_id("<nope>")
  # Specials and the image placeholder are skipped unless asked for.
  ids = [tok.bos_id, -200] + tok.encode("hé") + [tok.eos_id]
  assert tok.decode(ids) == "hé"
  assert tok.decode(ids, skip_special=False) == "<s>hé</s>"


@pytest.mark.parametrize("fixture", ["llama3_style_folder", "metaspace_folder",
                                     "sentencepiece_folder"])
def test_trained_tokenizers_encode_continuations(fixture, request):
  folder = request.getfixturevalue(fixture)
  tok, template = tokenizers_lib.load_hf_folder_tokenizer(folder)
  assert template == ("llama3" if fixture == "llama3_style_folder" else "vicuna_v1")
  for text in TEXTS[:4] + TEXTS[5:]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    # Decoders may drop a leading space; everything else must come back.
    assert tok.decode(ids).strip() == text.strip(), (fixture, text)
  # Continuation encoding adds no dummy prefix: pieces concatenate like the whole text.
  whole = "ASSISTANT: red"
  assert tok.decode(tok.encode("ASSISTANT:") + tok.encode(" red")) == whole
  assert tok.decode(tok.encode("USER:") + tok.encode("red")) == "USER:red"
  assert tok.bos_id is not None and tok.eos_id != tok.bos_id
  assert tok.encode("") == []


@pytest.mark.parametrize("fixture", ["llama3_style_folder", "metaspace_folder",
                                     "sentencepiece_folder"])
def test_pieces_match_the_unmodified_library_mid_sentence(fixture, request):
  """Ids of space-led pieces equal what the original tokenizer file gives the same text
  in the middle of a whole sentence (the reference is the library itself, dummy prefix
  and all)."""
  folder = request.getfixturevalue(fixture)
  tok, _ = tokenizers_lib.load_hf_folder_tokenizer(folder)
  rest = [" What color is the shape?", " ASSISTANT:", " red"]
  whole = "USER:" + "".join(rest)
  if fixture == "sentencepiece_folder":
    spm = pytest.importorskip("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    ref_ids = list(ref.EncodeAsIds(whole))
  else:
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ref_ids = ref.encode(whole, add_special_tokens=False).ids
  ours = sum((tok.encode(p) for p in rest), [])
  assert ref_ids[-len(ours):] == ours
  assert tok.decode(tok.encode("USER:") + ours) == whole


def test_hf_special_lookup_and_config(llama3_style_folder):
  tok = tokenizers_lib.load_tokenizer(llama3_style_folder)
  assert isinstance(tok, tokenizers_lib.HFTokenizer)
  assert tok.bos_id == tok.special_id("<|begin_of_text|>")
  assert tok.eos_id == tok.special_id("<|end_of_text|>")
  assert tok.token_id("<|eot_id|>") is not None
  assert tok.decode([tok.bos_id] + tok.encode("red"), skip_special=False) == \
      "<|begin_of_text|>red"


def test_tokenizers_pickle(llama3_style_folder, sentencepiece_folder):
  """grain worker processes receive the tokenizer by pickling."""
  for tok in (tokenizers_lib.ByteTokenizer(),
              tokenizers_lib.load_tokenizer(os.path.join(llama3_style_folder,
                                                         "tokenizer.json")),
              tokenizers_lib.load_tokenizer(os.path.join(sentencepiece_folder,
                                                         "tokenizer.model"))):
    clone = pickle.loads(pickle.dumps(tok))
    for text in TEXTS:
      assert clone.encode(text) == tok.encode(text)
    assert (clone.bos_id, clone.eos_id, clone.pad_id) == (tok.bos_id, tok.eos_id,
                                                           tok.pad_id)


def test_loader_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor"):
    tokenizers_lib.load_hf_folder_tokenizer(str(tmp_path))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tokenizers_lib.load_tokenizer(str(bad))
  with pytest.raises(FileNotFoundError, match="nothing.model"):
    tokenizers_lib.load_tokenizer(str(tmp_path / "nothing.model"))
  bad_model = tmp_path / "x.model"
  bad_model.write_bytes(b"\x00\x01garbage")
  with pytest.raises(ValueError, match="x.model"):
    tokenizers_lib.load_tokenizer(str(bad_model))
  assert isinstance(tokenizers_lib.load_tokenizer("byte"), tokenizers_lib.ByteTokenizer)


def test_folder_template_follows_vocab(tmp_path, metaspace_folder):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models
  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<|eot_id|>", "hi"])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|eot_id|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  # <|eot_id|> alone is not enough: Llama-3 needs the header markers too.
  assert tokenizers_lib.load_hf_folder_tokenizer(str(tmp_path))[1] == "vicuna_v1"
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": {"content": "<|eot_id|>"}}, f)
  tok2, _ = tokenizers_lib.load_hf_folder_tokenizer(str(tmp_path))
  assert tok2.eos_id == vocab["<|eot_id|>"]
  assert tokenizers_lib.load_hf_folder_tokenizer(metaspace_folder)[1] == "vicuna_v1"
