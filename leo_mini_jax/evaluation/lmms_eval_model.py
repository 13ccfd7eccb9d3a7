"""LEO-MINI as an lmms-eval model: any lmms-eval task on a trained or ported run.

    pip install -e . -r requirements-lmms.txt   # registers the `leo_mini_jax` model
    python -m lmms_eval --model leo_mini_jax \
        --model_args run=/runs/stage3,config=configs/leo_mini_llama3_8b.py:stage=3 \
        --tasks mme,pope --batch_size 16 --output_path /runs/stage3/lmms_eval

`run` is what eval.py's --workdir takes (a run workdir, a step directory or a params
checkpoint from porting.convert); `config` the run's config file, with the config's
arguments after ':' (separate them by ';' — lmms-eval splits model_args at commas — or
quote the value). lmms-eval's --batch_size is the global batch (eval.batch_size): every
request of a task is handed over at once and batched here by length. `max_new_tokens`
sets eval.max_new_tokens (a task's own `max_new_tokens` wins), `tokenizer` data.tokenizer,
and any dotted key that config field (`data.template=llama3`).

Generation is eval.py's: the question goes through the run's conversation template
(`<image>\\n` before it when the request has an image), the image through the training
data's preprocessing, and `generate.BatchGenerator` decodes greedily with the KV cache,
batched by prompt length; so for the same question and image the answer is eval.py's.
The model takes one image per question: of several, the first is used (logged once).
The answer is cut at the first of the request's `until` strings. `loglikelihood` and
multi-round generation are not supported (NotImplementedError naming the request type).
Run it as one process: the mesh spreads each batch over every local device.

lmms-eval finds the model through the `lmms_eval.models` entry point in pyproject.toml
(`manifest` below), which exists once the package is installed.
"""

import collections
import logging
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from leo_mini_jax import config_files
from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.evaluation import generate as generate_lib

MODEL_ID = "leo_mini_jax"
_log = logging.getLogger(__name__)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file 'path[:args]' (as train.py's --config; ';' may separate the args)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model_args config={spec!r}: no config file {path}")
  module = config_files.load_config_module(path, "_leo_mini_lmms_config")
  arg = arg.replace(";", ",")
  return module.get_config(arg) if arg else module.get_config()


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config.<dotted> = value; a field the config lacks is an error naming it."""
  node = config
  *parents, leaf = dotted.split(".")
  for i, key in enumerate(parents):
    if key not in node:
      raise KeyError(f"model_args {dotted}=...: the config has no field "
                     f"{'.'.join(parents[:i + 1])}")
    node = node[key]
  if leaf not in node:
    raise KeyError(f"model_args {dotted}=...: the config has no field {dotted}")
  node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


class Answerer:
  """eval.py's generation for lists of (question, image): the lmms-eval-free core."""

  def __init__(self, config: ml_collections.ConfigDict, run: str, mesh=None):
    from leo_mini_jax.evaluation import runner  # pylint: disable=import-outside-toplevel
    from leo_mini_jax import runtime  # pylint: disable=import-outside-toplevel
    self.config = config
    self.setup = runtime.ModelRuntime(config, mesh)
    self.params = runner.restore_params(self.setup, run)
    self.tokenizer = tokenizers_lib.load_tokenizer(config.data.tokenizer)
    self.template = pipeline_lib.resolve_template(config.data, self.tokenizer)
    self.eos_id = self.template.end_of_turn_id(self.tokenizer)
    self.stop_ids = tuple({self.tokenizer.eos_id, self.eos_id})
    self._generators: dict[int, generate_lib.BatchGenerator] = {}

  def load_image(self, source: Any) -> np.ndarray:
    data = self.config.data
    return images_lib.to_master_resolution(source, int(data.resolution),
                                           tuple(data.image_mean_rgb),
                                           limits=images_lib.limits_from_config(data))

  def prompt(self, question: str, image: Any) -> generate_lib.Prompt:
    if image is None:  # a marker without an image would be refused by the template
      question = question.replace(conversation_lib.IMAGE_MARKER, "").strip()
    tokens = generate_lib.build_prompt(question, self.tokenizer, self.template,
                                       image is not None)
    return generate_lib.Prompt(tokens, image)

  def answer(self, questions: Sequence[str], images: Sequence[Any],
             max_new_tokens: int | None = None, names: Sequence[str] | None = None
             ) -> list[str]:
    """Greedy answers, batched by prompt length; an image that fails to load is an error."""
    steps = int(max_new_tokens or self.config.eval.max_new_tokens)
    if steps not in self._generators:  # one per length: each compiles its own decode scan
      self._generators[steps] = generate_lib.BatchGenerator(
          self.setup, max_new_tokens=steps, eos_id=self.eos_id, routing=False)
    prompts = [self.prompt(q, image) for q, image in zip(questions, images)]
    generation = self._generators[steps](
        self.params, prompts, batch_size=int(self.config.eval.batch_size),
        resolution=int(self.config.data.resolution), load_image=self.load_image,
        pad_id=self.tokenizer.pad_id, names=names)
    if generation.failed:
      index, reason = generation.failed[0]
      name = names[index] if names else f"request #{index}"
      raise ValueError(f"{name}: image: {reason}")
    return generate_lib.decode_answers(np.stack(generation.tokens), self.tokenizer,
                                       self.stop_ids)


def cut_at(text: str, until: Sequence[str]) -> str:
  """`text` up to the first of the stop strings (lmms-eval's `until`)."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


def build_answerer(run: str, config: str, mesh=None, **overrides) -> Answerer:
  """An Answerer from lmms-eval's model_args (strings; dotted keys are config fields)."""
  cfg = load_config(config)
  aliases = {"batch_size": "eval.batch_size", "max_new_tokens": "eval.max_new_tokens",
             "tokenizer": "data.tokenizer"}
  unknown = sorted(k for k in overrides if k not in aliases and "." not in k)
  if unknown:
    raise TypeError(f"{MODEL_ID}: unknown model_args {unknown}; expected run, config, "
                    f"{', '.join(aliases)} or a dotted config field (eval.split=...)")
  for key, value in overrides.items():
    set_field(cfg, aliases.get(key, key), value)
  return Answerer(cfg, run, mesh)


def manifest():
  """The `lmms_eval.models` entry point: registers `--model leo_mini_jax`."""
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=import-outside-toplevel
  return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LeoMiniJax")


try:
  from lmms_eval.api.model import lmms as _LmmsBase  # pylint: disable=g-import-not-at-top
except ImportError:  # lmms-eval is optional; Answerer works without it
  _LmmsBase = None

if _LmmsBase is not None:

  class LeoMiniJax(_LmmsBase):
    """lmms-eval's simple-model interface over `Answerer`."""

    is_simple = True

    def __init__(self, run: str, config: str, mesh=None, **model_args):
      super().__init__()
      # lmms-eval passes its --batch_size (the global batch here, eval.batch_size; 'auto'
      # keeps the config's), --max_batch_size and --device (JAX places the mesh itself).
      for key in ("device", "max_batch_size"):
        model_args.pop(key, None)
      if not str(model_args.get("batch_size", "")).isdigit():
        model_args.pop("batch_size", None)
      self.answerer = build_answerer(run, config, mesh, **model_args)
      self._warned = set()

    def _warn_once(self, key: str, message: str) -> None:
      if key not in self._warned:
        self._warned.add(key)
        _log.warning("%s: %s", MODEL_ID, message)

    def _first_image(self, visuals) -> Any:
      visuals = [v for v in (visuals or []) if v is not None]
      if len(visuals) > 1:
        self._warn_once("images", "requests with several images: the first one is used")
      return visuals[0] if visuals else None

    def generate_until(self, requests) -> list[str]:
      # Requests sharing generation settings are generated together (batched by length).
      groups = collections.defaultdict(list)
      for index, request in enumerate(requests):
        _, gen_kwargs, *_ = request.args
        groups[int(gen_kwargs.get("max_new_tokens") or 0)].append(index)
      out = [""] * len(requests)
      for steps, indices in groups.items():
        questions, images, names = [], [], []
        for index in indices:
          context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[index].args
          if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample"):
            self._warn_once("sampling", "decoding is greedy; temperature/do_sample ignored")
          doc = self.task_dict[task][split][doc_id]
          questions.append(context)
          images.append(self._first_image(doc_to_visual(doc) if doc_to_visual else None))
          names.append(f"{task}/{split} doc {doc_id}")
        answers = self.answerer.answer(questions, images, steps or None, names)
        for index, answer in zip(indices, answers):
          until = requests[index].args[1].get("until") or []
          out[index] = cut_at(answer, [until] if isinstance(until, str) else until)
      return out

    def loglikelihood(self, requests):
      raise NotImplementedError(
          f"{MODEL_ID}: loglikelihood requests (tasks scored by answer likelihood) are not "
          "supported; use a generate_until task variant")

    def generate_until_multi_round(self, requests):
      raise NotImplementedError(f"{MODEL_ID}: multi-round generation is not supported")
