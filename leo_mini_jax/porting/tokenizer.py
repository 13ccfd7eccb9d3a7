"""Tokenizer and chat template of an HF checkpoint folder, checked against its LLM.

The tokenizers themselves live in `leo_mini_jax.data.tokenizers` (tokenizer.json via HF
`tokenizers`, tokenizer.model via sentencepiece); the folder's vocabulary names the
conversation template: Llama-3 chat markers → 'llama3', otherwise 'vicuna_v1'. This
module adds the check a port needs: every id the tokenizer can produce must have a row in
the LLM's embedding table.
"""

import os

from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.models import llama as llama_lib


def load_tokenizer(folder: str | os.PathLike,
                   llm_config: llama_lib.LlamaConfig | None = None
                   ) -> tuple[tokenizers_lib.Tokenizer, str]:
  """(tokenizer, template name) for an HF folder.

  Args:
    folder: holds tokenizer.json or tokenizer.model (and optionally tokenizer_config.json /
      special_tokens_map.json naming bos/eos/pad).
    llm_config: when given, the tokenizer's ids must fit its vocab_size.

  Raises:
    ValueError naming the folder when the vocabulary is larger than the embedding table.
  """
  folder = os.fspath(folder)
  tokenizer, template = tokenizers_lib.load_hf_folder_tokenizer(folder)
  if llm_config is not None:
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    too_big = {k: v for k, v in specials.items() if v is not None and v >= llm_config.vocab_size}
    if tokenizer.vocab_size > llm_config.vocab_size or too_big:
      raise ValueError(
          f"{folder}: tokenizer has {tokenizer.vocab_size} ids (specials {specials}) but the "
          f"LLM's embedding table has only {llm_config.vocab_size} rows")
  return tokenizer, template
