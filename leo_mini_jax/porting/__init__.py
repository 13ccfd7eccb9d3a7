"""Weight ports from PyTorch checkpoints (HF transformers, timm/open_clip) and back.

    model, params, config = load_llm("/ckpt/Meta-Llama-3-8B")
    logits = model.apply({"params": params}, input_ids)          # [B, L, vocab]
    clip, clip_params = load_vision_expert("clip", "/ckpt/clip-vit-large-patch14-336")

Each source has a declarative mapping table (`mapping.Rule`s) in its own module;
`mapping.convert` checks a checkpoint against the model's abstract parameter tree and
reports every missing, unexpected and shape-mismatched key by name.
"""

import importlib
import os
from typing import Any

from leo_mini_jax.models.vision import experts
from leo_mini_jax.porting.mapping import PortError
from leo_mini_jax.porting.readers import open_checkpoint

# Vision expert name → its port module, imported on first use: the expert registry's
# `port` (`models/vision/experts.py`); the module's contract is `expert_port.ExpertPort`.
VISION_PORTS = experts.port_modules()


def vision_port(name: str):
  """The port module of a vision expert (see VISION_PORTS)."""
  if name not in VISION_PORTS:
    raise ValueError(f"unknown vision expert {name!r}; known: {sorted(VISION_PORTS)}")
  return importlib.import_module(VISION_PORTS[name])


def load_llm(path: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32",
             scan_layers: bool = True, **kwargs: Any):
  """HF LLaMA-family folder → (model, params, config); see `porting.llama.load_llm`."""
  from leo_mini_jax.porting import llama  # pylint: disable=import-outside-toplevel
  return llama.load_llm(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                        **kwargs)


def load_vision_expert(name: str, path: str | os.PathLike, **kwargs: Any):
  """Vision expert checkpoint → (model, params).

  `model.apply({'params': params}, pixels)` maps normalised NHWC float pixels at the
  expert's input size to features [batch, tokens, dim]. `kwargs` go to the expert's
  loader (e.g. `cls_token='drop'`, `image_size=...` for CLIP).
  """
  return vision_port(name).load_expert(path, **kwargs)


__all__ = ["load_llm", "load_vision_expert", "open_checkpoint", "PortError", "VISION_PORTS", "vision_port"]
