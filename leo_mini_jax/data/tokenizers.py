"""Tokenizers behind one small interface.

Every tokenizer here encodes a piece of text *as a continuation*: no BOS/EOS is added
and no "dummy prefix" space is inserted before the first word. Conversation templates
(conversation.py) tokenize a prompt piece by piece and concatenate the ids, so each
piece must encode exactly the characters it holds; separators carry their spaces
explicitly (" ASSISTANT:", " red"). Loading switches the dummy prefix off where a file
turns it on (sentencepiece add_dummy_prefix, HF Prepend/Metaspace/ByteLevel prefix
space), as HF's non-legacy Llama tokenizer does; the first word after BOS is then
encoded without "▁" (a one-token difference from whole-string Llama-2 tokenization).

  ByteTokenizer            dependency-free; ids 0..255 are UTF-8 bytes, then specials.
  HFTokenizer              a HF `tokenizers` tokenizer.json.
  SentencePieceTokenizer   a sentencepiece tokenizer.model.

`load_tokenizer('byte' | path)` picks one; `load_hf_folder_tokenizer(dir)` reads a
checkpoint folder and also names the conversation template that matches its vocabulary.
"""

import abc
import importlib
import json
import os
from typing import Sequence

# Special strings looked up when a tokenizer's own config does not name them.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>")
_PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<unk>")
LLAMA3_MARKERS = ("<|eot_id|>", "<|start_header_id|>")


class Tokenizer(abc.ABC):
  """Common interface. Ids are Python ints; `vocab_size` bounds every id produced."""

  bos_id: int | None
  eos_id: int
  pad_id: int
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text` as a continuation (no BOS/EOS, no dummy prefix)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; negative ids (the image placeholder) and, by default, special
    tokens are skipped."""

  @abc.abstractmethod
  def token_id(self, token: str) -> int | None:
    """Id of a special string such as '<|eot_id|>', or None if the vocabulary lacks it."""

  def token_name(self, token_id: int) -> str | None:
    """The vocabulary entry of `token_id` (e.g. '</s>'), None if there is none."""
    del token_id
    return None

  def special_id(self, token: str) -> int:
    """Like `token_id` but raises a KeyError naming the token and the tokenizer."""
    token_id = self.token_id(token)
    if token_id is None:
      raise KeyError(f"{self!r} has no token {token!r}")
    return token_id


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes (ids 0..255) plus a few special tokens; vocab_size 262 (<= 320)."""

  SPECIALS = ("<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>")
  # Other spellings of the same roles, so templates written for Llama-3 or Llama-2
  # names find them.
  ALIASES = {"<|begin_of_text|>": "<s>", "<|end_of_text|>": "</s>", "<bos>": "<s>",
             "<eos>": "</s>"}

  def __init__(self):
    self._special_ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
    self._special_names = {i: name for name, i in self._special_ids.items()}
    self.pad_id = self._special_ids["<pad>"]
    self.bos_id = self._special_ids["<s>"]
    self.eos_id = self._special_ids["</s>"]
    self.vocab_size = 256 + len(self.SPECIALS)

  def __repr__(self):
    return "ByteTokenizer()"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    out, pending = [], bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        pending.append(i)
        continue
      out.append(pending.decode("utf-8", errors="replace"))
      pending = bytearray()
      if not skip_special and i in self._special_names:
        out.append(self._special_names[i])
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)

  def token_id(self, token: str) -> int | None:
    return self._special_ids.get(self.ALIASES.get(token, token))

  def token_name(self, token_id: int) -> str | None:
    return self._special_names.get(int(token_id))


_PREFIX_MARKS = ("\u2581", "\u0120")  # "▁" (sentencepiece, Metaspace), "Ġ" (byte-level)


def _hf_spec_without_dummy_prefix(spec: dict) -> dict:
  """A tokenizer.json dict with the dummy-prefix space switched off.

  Covers the three places HF tokenizers add it: a `Prepend("▁")` normalizer (Llama-2
  legacy files), a Metaspace pre-tokenizer (prepend_scheme / add_prefix_space) and a
  ByteLevel pre-tokenizer with add_prefix_space.
  """
  def fix_normalizer(node):
    if not isinstance(node, dict):
      return node
    if node.get("type") == "Prepend":
      return None
    if node.get("type") == "Sequence":
      node["normalizers"] = [n for n in map(fix_normalizer, node["normalizers"]) if n]
    return node

  def fix_pre_tokenizer(node):
    if not isinstance(node, dict):
      return
    if node.get("type") == "Metaspace":
      node["prepend_scheme"] = "never"
      if "add_prefix_space" in node:
        node["add_prefix_space"] = False
    elif node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
      node["add_prefix_space"] = False
    for child in node.get("pretokenizers", ()):
      fix_pre_tokenizer(child)

  spec["normalizer"] = fix_normalizer(spec.get("normalizer"))
  fix_pre_tokenizer(spec.get("pre_tokenizer"))
  return spec


class _SentinelContinuation:
  """Fallback for tokenizers whose dummy prefix could not be switched off.

  Encodes `"\n" + text` and drops the ids of "\n": the ids `text` has mid-sentence.
  If "\n" merged with the text (its ids are not a prefix), the plain encoding is used.
  """

  SENTINEL = "\n"

  def __init__(self, raw_encode):
    self.sentinel_ids = raw_encode(self.SENTINEL)

  def __call__(self, raw_encode, text: str) -> list[int]:
    n = len(self.sentinel_ids)
    if text and n:
      ids = raw_encode(self.SENTINEL + text)
      if ids[:n] == self.sentinel_ids:
        return ids[n:]
    return raw_encode(text) if text else []


def _read_special_names(folder: str | None) -> dict[str, str]:
  """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json."""
  names = {}
  if not folder:
    return names
  for filename in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, filename)
    if not os.path.exists(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read tokenizer config {path}: {e}") from None
    for role in ("bos", "eos", "pad"):
      value = cfg.get(f"{role}_token")
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and value:
        names[role] = value  # the later file (tokenizer_config.json) wins
  return names


def _first_present(tokenizer: Tokenizer, names: Sequence[str | None]) -> int | None:
  for name in names:
    if name:
      token_id = tokenizer.token_id(name)
      if token_id is not None:
        return token_id
  return None


def _resolve_specials(tok: Tokenizer, path: str, bos: str | None, eos: str | None,
                      pad: str | None, default_bos: int | None = None,
                      default_eos: int | None = None, default_pad: int | None = None):
  tok.bos_id = _first_present(tok, (bos,)) if bos else None
  if tok.bos_id is None:
    tok.bos_id = default_bos if default_bos is not None else _first_present(
        tok, _BOS_CANDIDATES)
  eos_id = _first_present(tok, (eos,)) if eos else None
  if eos_id is None:
    eos_id = default_eos if default_eos is not None else _first_present(
        tok, _EOS_CANDIDATES)
  if eos_id is None:
    raise ValueError(
        f"{path}: no end-of-sequence token found (looked for {eos!r} and "
        f"{_EOS_CANDIDATES}); pass eos_token=")
  tok.eos_id = eos_id
  pad_id = _first_present(tok, (pad,)) if pad else None
  if pad_id is None:
    pad_id = default_pad if default_pad is not None else _first_present(
        tok, _PAD_CANDIDATES)
  # Padding is masked everywhere, so any valid id serves when the vocab has no pad.
  tok.pad_id = pad_id if pad_id is not None else eos_id


def _reader_for(path: str, package: str):
  """The package that reads the tokenizer file at `path`; a missing one is named."""
  try:
    module = importlib.import_module(package)
  except ImportError as e:
    raise ImportError(f"reading {path} needs the '{package}' package") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  return module


class HFTokenizer(Tokenizer):
  """A HF `tokenizers` tokenizer.json (Llama-3, Vicuna exported to tokenizer.json, ...)."""

  def __init__(self, path: str, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None):
    tokenizers = _reader_for(path, "tokenizers")
    try:
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
      self._tok = tokenizers.Tokenizer.from_str(
          json.dumps(_hf_spec_without_dummy_prefix(spec)))
    except Exception as e:  # json errors, and the Rust side raises plain Exception
      raise ValueError(f"cannot read tokenizer {path}: {e}") from None
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    first = self._tok.encode("a", add_special_tokens=False).tokens
    self._fallback = None
    if first and first[0].startswith(_PREFIX_MARKS):
      self._fallback = _SentinelContinuation(self._raw_encode)
    names = _read_special_names(os.path.dirname(path))
    _resolve_specials(self, path, bos_token or names.get("bos"),
                      eos_token or names.get("eos"), pad_token or names.get("pad"))

  def __repr__(self):
    return f"HFTokenizer({self.path!r})"

  def _raw_encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode(self, text: str) -> list[int]:
    if self._fallback is not None:
      return self._fallback(self._raw_encode, text)
    return self._raw_encode(text) if text else []

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids if int(i) >= 0]
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def token_name(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))


def _sp_proto_without_dummy_prefix(path: str) -> bytes:
  """The serialized model with add_dummy_prefix off (as HF's non-legacy Llama tokenizer).

  Only for models that keep whitespace (remove_extra_whitespaces=False, as Llama's):
  models that collapse whitespace cannot carry a leading space in a piece, and for them
  the dummy prefix is what turns " red" into "▁red". Without protobuf the file is used
  unchanged (and encode falls back to the sentinel method).
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return data
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(data)
  except Exception as e:  # protobuf's DecodeError
    raise ValueError(f"cannot read sentencepiece model {path}: {e}") from None
  if proto.normalizer_spec.remove_extra_whitespaces:
    return data
  proto.normalizer_spec.add_dummy_prefix = False
  return proto.SerializeToString()


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece tokenizer.model (Llama-2 / Vicuna)."""

  def __init__(self, path: str, *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None):
    sentencepiece = _reader_for(path, "sentencepiece")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(_sp_proto_without_dummy_prefix(path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"cannot read sentencepiece model {path}: {e}") from None
    self.path = path
    self.vocab_size = self._sp.GetPieceSize()
    first = self._sp.EncodeAsPieces("a")
    self._fallback = None
    if first and first[0].startswith(_PREFIX_MARKS):
      self._fallback = _SentinelContinuation(self._raw_encode)
    names = _read_special_names(os.path.dirname(path))
    own = lambda i: i if i >= 0 else None  # sentencepiece answers -1 for "none"
    _resolve_specials(self, path, bos_token or names.get("bos"),
                      eos_token or names.get("eos"), pad_token or names.get("pad"),
                      default_bos=own(self._sp.bos_id()), default_eos=own(self._sp.eos_id()),
                      default_pad=own(self._sp.pad_id()))

  def __repr__(self):
    return f"SentencePieceTokenizer({self.path!r})"

  def _raw_encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def encode(self, text: str) -> list[int]:
    if self._fallback is not None:
      return self._fallback(self._raw_encode, text)
    return self._raw_encode(text) if text else []

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if skip_special:
      keep = [i for i in keep if not self._sp.IsControl(i)]
    return self._sp.DecodeIds(keep)

  def token_id(self, token: str) -> int | None:
    token_id = self._sp.PieceToId(token)
    if token_id < 0 or self._sp.IdToPiece(token_id) != token:
      return None  # PieceToId answers unk for unknown pieces
    return token_id

  def token_name(self, token_id: int) -> str | None:
    return self._sp.IdToPiece(int(token_id)) if 0 <= int(token_id) < self.vocab_size else None


def template_for(tokenizer: Tokenizer) -> str:
  """The conversation template a vocabulary implies: Llama-3 chat markers → 'llama3'."""
  if all(tokenizer.token_id(m) is not None for m in LLAMA3_MARKERS):
    return "llama3"
  return "vicuna_v1"


def load_hf_folder_tokenizer(folder: str) -> tuple[Tokenizer, str]:
  """(tokenizer, template name) for a checkpoint folder with tokenizer.json or .model.

  tokenizer.json is preferred when both exist (it carries added tokens). bos/eos/pad come
  from tokenizer_config.json / special_tokens_map.json when present.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder not found: {folder}")
  json_path = os.path.join(folder, "tokenizer.json")
  model_path = os.path.join(folder, "tokenizer.model")
  if os.path.isfile(json_path):
    tokenizer = HFTokenizer(json_path)
  elif os.path.isfile(model_path):
    tokenizer = SentencePieceTokenizer(model_path)
  else:
    raise FileNotFoundError(
        f"{folder}: neither tokenizer.json nor tokenizer.model is present")
  return tokenizer, template_for(tokenizer)


def load_tokenizer(path_or_kind: str) -> Tokenizer:
  """'byte', a tokenizer.json, a sentencepiece .model file, or a checkpoint folder."""
  if path_or_kind == "byte":
    return ByteTokenizer()
  if os.path.isdir(path_or_kind):
    return load_hf_folder_tokenizer(path_or_kind)[0]
  if path_or_kind.endswith(".json"):
    return HFTokenizer(path_or_kind)
  if path_or_kind.endswith(".model"):
    return SentencePieceTokenizer(path_or_kind)
  if not os.path.exists(path_or_kind):
    raise FileNotFoundError(
        f"tokenizer {path_or_kind!r}: not 'byte' and no such file or folder")
  raise ValueError(f"tokenizer {path_or_kind!r}: expected 'byte', a .json, a .model "
                   "or a folder holding one")
