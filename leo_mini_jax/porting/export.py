"""Our LLM params → an HF `LlamaForCausalLM` safetensors folder that transformers loads.

    export_llm(params["llm"], config.llm, "/out/my-llama", dtype="bfloat16",
               tokenizer=config.data.tokenizer)  # a folder, tokenizer.json or .model

The tokenizer files are written beside the weights, with a tokenizer_config.json naming
bos/eos/pad where the source has none, and those ids in config.json and
generation_config.json, so `AutoTokenizer.from_pretrained(out)` and
`AutoModelForCausalLM.from_pretrained(out)` both load the folder and generation stops at
the tokenizer's end of sequence.

The key layout is the LLaMA port's mapping table run backwards (`plan_export`),
so export and import cannot drift apart. Files are written tensor by tensor: each shard's
header is computed from shapes first, then every tensor (one stacked layer slice at a
time) is converted and appended, so the host holds one tensor beside the params. A
folder over `max_shard_size` is split into `model-0000k-of-0000n.safetensors` with a
`model.safetensors.index.json`, as `save_pretrained` does. `config.json` is written in the
transformers 4.x form (`rope_theta`, `rope_scaling`, `torch_dtype`) that both 4.x and 5.x
read. Exporting params loaded at the checkpoint's own dtype reproduces every tensor
bit for bit.
"""

import collections
import dataclasses
import itertools
import json
import os
import re
import shutil
import struct
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.porting import llama as llama_port
from leo_mini_jax.porting import mapping

# numpy dtype → (safetensors dtype name, torch dtype name for config.json)
_DTYPE_NAMES = {
    np.dtype(np.float32): ("F32", "float32"),
    np.dtype(np.float16): ("F16", "float16"),
    np.dtype(ml_dtypes.bfloat16): ("BF16", "bfloat16"),
    np.dtype(np.float64): ("F64", "float64"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
# The transformers class that reads each vocabulary file when no tokenizer_config.json says.
_TOKENIZER_CLASSES = {"tokenizer.json": "PreTrainedTokenizerFast",
                      "tokenizer.model": "LlamaTokenizer"}


@dataclasses.dataclass(frozen=True)
class ExportItem:
  """One source-layout tensor to write: its key, shape, dtype and how to produce it."""
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  target: str
  index: tuple[int, ...]
  _leaf: Any = dataclasses.field(repr=False, compare=False)
  _invert: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False, compare=False)

  def load(self, dtype=None) -> np.ndarray:
    """The tensor in the source layout (reads one stacked slice at a time)."""
    value = self._leaf[self.index] if self.index else self._leaf
    value = np.asarray(jax.device_get(value))
    if dtype is not None:
      value = value.astype(np.dtype(dtype), copy=False)
    return np.ascontiguousarray(self._invert(value))


def plan_export(params: Mapping[str, Any], rules: Sequence[mapping.Rule],
                exclude: str | None = None) -> list[ExportItem]:
  """Inverts a mapping table: which source key each parameter (or stacked slice) becomes.

  Every rule with one target and an invertible transform is used in reverse; the source
  key is the rule's regex written out with the group values (so rules meant for export
  need plain regexes: escaped literals, named groups, optional `(?:prefix)?` groups which
  are written present). Parameters no rule covers raise a ValueError listing them all,
  unless they fully match `exclude`.
  """
  flat = mapping.flatten_tree(params)
  items: list[ExportItem] = []
  covered = set()
  for rule in rules:
    if rule.target is None:
      continue
    if len(rule.targets) != 1 or rule.transform.invert is None:
      raise ValueError(f"Rule {rule.source!r} ({rule.transform.name}) cannot be inverted")
    template = rule.targets[0]
    pattern = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)))
    for path in flat:
      m = pattern.fullmatch(path)
      if not m or path in covered:
        continue
      covered.add(path)
      leaf = flat[path]
      depth = len(rule.stack)
      for index in itertools.product(*(range(n) for n in leaf.shape[:depth])):
        groups = dict(m.groupdict(), **{g: str(i) for g, i in zip(rule.stack, index)})
        key = mapping.source_key(rule, groups)
        if key.startswith("a key matching"):
          raise ValueError(f"Rule {rule.source!r}: cannot write out a source key from this regex")
        # a zero-stride stand-in: the shape without allocating the tensor
        stand_in = np.broadcast_to(np.zeros((), np.bool_), leaf.shape[depth:])
        shape = tuple(rule.transform.invert(stand_in).shape)
        items.append(ExportItem(key, shape, np.dtype(leaf.dtype), path, index, leaf,
                                rule.transform.invert))
  uncovered = [p for p in flat if p not in covered
               and not (exclude is not None and re.fullmatch(exclude, p))]
  if uncovered:
    raise ValueError(f"{len(uncovered)} parameter(s) have no place in the export layout: "
                     f"{uncovered}")
  twice = sorted(k for k, n in collections.Counter(i.key for i in items).items() if n > 1)
  if twice:
    raise ValueError(f"export writes some keys twice: {twice}")
  return items


def parse_size(size: int | str) -> int:
  """Bytes from 5_000_000_000, '5GB' (10^9) or '4GiB' (2^30), as save_pretrained reads them."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB', '4GiB'")
  unit = (m.group(2) or "B").upper()
  powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
  if unit not in powers:
    raise ValueError(f"max_shard_size={size!r}: unknown unit {m.group(2)!r}")
  return int(float(m.group(1)) * powers[unit])


def hf_config(config: llama_lib.LlamaConfig, torch_dtype: str,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json contents (transformers 4.x form) for `config`."""
  scaling = None
  if config.rope_scaling is not None:
    s = config.rope_scaling
    scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor,
               "original_max_position_embeddings": s.original_max_position_embeddings}
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.dim_per_head,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "tie_word_embeddings": config.tie_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": torch_dtype,
  }
  out.update(extra or {})
  return out


def _header(items: list[ExportItem], dtype) -> tuple[bytes, list[int]]:
  """safetensors header bytes (padded to 8) and each tensor's byte size, in item order."""
  entries, sizes, offset = {}, [], 0
  for item in items:
    out_dtype = np.dtype(dtype) if dtype is not None else item.dtype
    size = int(np.prod(item.shape, dtype=np.int64)) * out_dtype.itemsize
    entries[item.key] = {"dtype": _DTYPE_NAMES[out_dtype][0], "shape": list(item.shape),
                         "data_offsets": [offset, offset + size]}
    sizes.append(size)
    offset += size
  entries["__metadata__"] = {"format": "pt"}
  header = json.dumps(entries, separators=(",", ":")).encode()
  header += b" " * (-len(header) % 8)
  return header, sizes


def write_safetensors(path: str, items: list[ExportItem], dtype=None) -> int:
  """Writes `items` to one .safetensors file, one tensor at a time; returns data bytes."""
  header, sizes = _header(items, dtype)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for item, size in zip(items, sizes):
      value = item.load(dtype)
      if value.dtype.byteorder == ">":
        value = value.byteswap().view(value.dtype.newbyteorder("<"))
      data = value.tobytes()
      if len(data) != size:
        raise AssertionError(f"{item.key}: wrote {len(data)} bytes, header says {size}")
      f.write(data)
      del value, data
  return sum(sizes)


def _shards(items: list[ExportItem], limit: int, itemsize) -> list[list[ExportItem]]:
  """Greedy split in order: a new shard starts when the next tensor would pass `limit`."""
  shards, current, size = [], [], 0
  for item in items:
    n = int(np.prod(item.shape, dtype=np.int64)) * itemsize(item)
    if current and size + n > limit:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += n
  if current:
    shards.append(current)
  return shards


def export_llm(params: Mapping[str, Any], config: llama_lib.LlamaConfig,
               out_dir: str | os.PathLike, *, dtype: str | None = None,
               max_shard_size: int | str = "5GB", tokenizer: str | None = None,
               extra_config: Mapping[str, Any] | None = None,
               exclude: str | None = None) -> list[str]:
  """Writes `params` of `LlamaForCausalLM(config)` as an HF LlamaForCausalLM folder.

  Args:
    params: the LLM's params tree (scanned or unscanned, as `config.scan_layers` says).
    config: its LlamaConfig.
    out_dir: created if absent; existing model files in it are replaced.
    dtype: 'float32' / 'bfloat16' / 'float16'; None keeps each parameter's dtype.
    max_shard_size: bytes or a string such as '5GB'.
    tokenizer: a tokenizer folder, tokenizer.json or tokenizer.model (`data.tokenizer`):
      its files are written beside the weights (see `write_tokenizer`).
    extra_config: more config.json fields (they win over the tokenizer's special ids).
    exclude: regex of parameter paths to leave out (e.g. '.*mmoe_.*' for a stage-3 LLM,
      whose LoRA experts and routers HF's LlamaForCausalLM has no place for). Without it
      any parameter outside the LLaMA layout is an error naming it.

  Returns:
    The paths written.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  items = plan_export(params, llama_port.llama_rules(config), exclude=exclude)
  target = np.dtype(jnp_dtype(dtype)) if dtype is not None else None
  dtypes = {target} if target is not None else {item.dtype for item in items}
  unsupported = [str(d) for d in dtypes if d not in _DTYPE_NAMES]
  if unsupported:
    raise ValueError(f"cannot export dtype(s) {unsupported}; supported: "
                     f"{[str(d) for d in _DTYPE_NAMES]}")
  torch_dtype = _DTYPE_NAMES[target][1] if target is not None else (
      _DTYPE_NAMES[max(dtypes, key=lambda d: d.itemsize)][1])
  for name in os.listdir(out_dir):  # stale shards from an earlier export would confuse loaders
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
      os.remove(os.path.join(out_dir, name))

  itemsize = lambda item: (target or item.dtype).itemsize
  shards = _shards(items, parse_size(max_shard_size), itemsize)
  written = []
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    path = os.path.join(out_dir, name)
    total += write_safetensors(path, shard, target)
    weight_map.update({item.key: name for item in shard})
    written.append(path)
  if len(shards) > 1:
    path = os.path.join(out_dir, "model.safetensors.index.json")
    with open(path, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(path)
  special_ids = {}
  if tokenizer is not None:
    tokenizer_files, special_ids = write_tokenizer(tokenizer, out_dir,
                                                   config.max_position_embeddings)
    written += tokenizer_files
  path = os.path.join(out_dir, "config.json")
  with open(path, "w") as f:
    json.dump(hf_config(config, torch_dtype, {**special_ids, **(extra_config or {})}), f,
              indent=2)
  written.append(path)
  return written


def jnp_dtype(name: str):
  """'bfloat16' → ml_dtypes.bfloat16 etc. (numpy names otherwise)."""
  return ml_dtypes.bfloat16 if str(name) == "bfloat16" else np.dtype(name)


def write_tokenizer(source: str, out_dir: str, max_length: int
                    ) -> tuple[list[str], dict[str, int]]:
  """Writes the tokenizer `source` (folder, tokenizer.json or tokenizer.model) into
  `out_dir` as transformers reads it; returns (paths written, {bos/eos/pad_token_id}).

  The vocabulary file and the configs beside it are copied. Where the source has no
  tokenizer_config.json (a bare tokenizer.json, as `data.tokenizer` may name), one is
  written naming the class and the bos/eos/pad tokens this project resolves (without it
  transformers loads no eos and generation never stops); likewise generation_config.json.
  """
  from leo_mini_jax.data import tokenizers as tokenizers_lib  # pylint: disable=import-outside-toplevel
  source = os.fspath(source)
  if source == "byte":
    raise ValueError("the byte tokenizer has no files transformers can read; export "
                     "without a tokenizer")
  if os.path.isdir(source):
    folder, vocab = source, [n for n in _TOKENIZER_CLASSES
                             if os.path.isfile(os.path.join(source, n))][:1]
  elif os.path.isfile(source) and source.endswith((".json", ".model")):
    folder, vocab = os.path.dirname(source), [os.path.basename(source)]
  else:
    raise FileNotFoundError(f"tokenizer {source}: expected a folder, a tokenizer.json or a "
                            "tokenizer.model")
  if not vocab:
    raise FileNotFoundError(f"{source}: neither tokenizer.json nor tokenizer.model to copy")
  # The vocabulary under the name transformers looks for (a.json → tokenizer.json).
  target = "tokenizer.json" if vocab[0].endswith(".json") else "tokenizer.model"
  copies = {os.path.join(folder, vocab[0]): target}
  copies.update({os.path.join(folder, n): n for n in TOKENIZER_FILES[2:]
                 if os.path.isfile(os.path.join(folder, n))})
  written = []
  for src, name in copies.items():
    shutil.copyfile(src, os.path.join(out_dir, name))
    written.append(os.path.join(out_dir, name))
  tok = tokenizers_lib.load_tokenizer(os.path.join(out_dir, target))
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  ids = {k: int(v) for k, v in ids.items() if v is not None}
  defaults = {
      "tokenizer_config.json": {"tokenizer_class": _TOKENIZER_CLASSES[target],
                                "model_max_length": int(max_length),
                                **{k.removesuffix("_id"): tok.token_name(v)
                                   for k, v in ids.items()}},
      "generation_config.json": dict(ids),
  }
  for name, content in defaults.items():
    path = os.path.join(out_dir, name)
    if path not in written:
      with open(path, "w") as f:
        json.dump(content, f, indent=2)
      written.append(path)
  return written, ids
