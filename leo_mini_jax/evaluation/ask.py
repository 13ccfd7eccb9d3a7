"""Ask a trained or ported LEO-MINI about your own image.

  python -m leo_mini_jax.evaluation.ask --config configs/tiny.py:stage=3 \
      --workdir /tmp/tiny3 --image photo.png --question "What colour is the shape?"

Without --question it reads questions from stdin, one per line, and keeps the
conversation (the image in the first user turn, every answer as an assistant turn)
through the config's template, as LLaVA's CLI does; an empty line or end of input ends
it. For every answer it prints:

  answer: <the generated text>
  visual tokens: <N^V the LLM sees>
  routing: <per MMoE-LLM layer, the share of the answer's tokens each expert took, and
           the expert of every answer token in order> (or why there is none)

--workdir is a run's workdir (its latest checkpoint), a step directory, or a params-only
checkpoint written by `python -m leo_mini_jax.porting.convert` (a converted EAGLE
release is one: ask it with the stage-2 config, whose model has no CoTR / MMoE-LLM). The
image goes through the training data's host preprocessing (pad to square with the mean
colour, resize to data.resolution). Greedy decoding by default; --temperature > 0 samples,
with --top_p nucleus filtering, from a pure jitted function with an explicit PRNG key.
A missing or unreadable image or checkpoint is a one-line error naming it. Without
--config, a run's workdir supplies its own saved config (config.json: its tokenizer and
template); a --config that contradicts the run is refused, naming both values.
"""

import dataclasses
import os
import sys
from typing import Any, Callable

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax import cli
from leo_mini_jax import run_record
from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import pipeline as pipeline_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.evaluation import generate as generate_lib
from leo_mini_jax.models import factory

LENGTH_BUCKET = 64  # prompts are padded to a multiple of this: few shapes to compile


class AskError(cli.UserError):
  """A one-line, user-facing failure (bad image, checkpoint, tokenizer)."""


# ----------------------------------------------------------------------------- sampling


def sample_token(logits: jax.Array, key: jax.Array, temperature: float,
                 top_p: float = 1.0) -> jax.Array:
  """Next token ids [B] from logits [B, V]; pure (the randomness is `key`).

  temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted
  to the smallest set of most likely tokens whose probability reaches `top_p` (the most
  likely token is always kept).
  """
  logits = logits.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_sampling_generate(model, max_new_tokens: int, eos_id: int, temperature: float,
                           top_p: float) -> Callable:
  """`generate(params, batch, key) -> dict` (pure, jit-able): `generate.make_generate`
  (tokens and, with MMoE-LLM, routing) with `sample_token` in place of argmax."""
  generate = generate_lib.make_generate(
      model, max_new_tokens, eos_id,
      choose=lambda logits, key: sample_token(logits, key, temperature, top_p))
  return lambda params, batch, key: generate(params, batch, key=key)


# ----------------------------------------------------------------------------- the model


def load_image(path: str, data_cfg) -> np.ndarray:
  """uint8 [S, S, 3] through the training data's host preprocessing, or AskError."""
  if not os.path.exists(path):  # a FIFO or device exists: the reader names what it is
    raise AskError(f"image not found: {path}")
  try:
    return images_lib.to_master_resolution(path, int(data_cfg.resolution),
                                           tuple(data_cfg.image_mean_rgb),
                                           data_cfg.get("image_aspect", "pad"),
                                           images_lib.limits_from_config(data_cfg))
  except OSError as e:  # its message names the path
    raise AskError(str(e).split(" <_io.")[0]) from None
  except ValueError as e:
    raise AskError(f"cannot read image {path}: {e}") from None


def restore_params(config: ml_collections.ConfigDict, checkpoint: str, model) -> Any:
  """Params of a run workdir / step dir / params-only checkpoint on device 0, or AskError."""
  if not os.path.exists(checkpoint):
    raise AskError(f"checkpoint not found: {checkpoint}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          factory.abstract_params(config, model, boxed=False))
  try:
    params, _ = checkpoints_lib.load_params(checkpoint, abstract)
  except FileNotFoundError as e:
    raise AskError(f"no checkpoint in {checkpoint}: {str(e).removeprefix('init_from: ')}"
                   ) from None
  except ValueError as e:
    lines = str(e).splitlines()
    detail = "; ".join(line.strip()[:200] for line in lines[1:]) or lines[0]
    raise AskError(f"checkpoint {checkpoint} does not fit the config's model: {detail}"
                   ) from None
  except Exception as e:  # orbax raises several types for a folder that is no checkpoint
    first = str(e).splitlines()[0] if str(e) else ""
    raise AskError(f"{checkpoint} is not a run workdir or a params checkpoint "
                   f"({type(e).__name__}: {first})") from None
  return params


@dataclasses.dataclass
class Reply:
  answer: str
  answer_ids: list[int]
  num_visual_tokens: int
  routing: np.ndarray | None  # [layers, answer tokens] expert ids; None without MMoE
  num_experts: int


class Assistant:
  """A restored model + tokenizer + template, answering one conversation at a time."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint: str,
               max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0):
    self.config = config
    try:
      self.tokenizer = tokenizers_lib.load_tokenizer(config.data.tokenizer or "")
    except (FileNotFoundError, ValueError) as e:
      raise AskError(f"tokenizer (data.tokenizer={config.data.tokenizer!r}): {e}; set "
                     "--config.data.tokenizer to the LLM's tokenizer folder") from None
    self.template = pipeline_lib.resolve_template(config.data, self.tokenizer)
    self.model = factory.build_model(config)
    self.params = restore_params(config, checkpoint, self.model)
    self.max_new_tokens = int(max_new_tokens or config.eval.max_new_tokens
                              or generate_lib.DEFAULT_ANSWER_TOKENS)
    eos = self.template.end_of_turn_id(self.tokenizer)
    self.stop_ids = tuple({self.tokenizer.eos_id, eos})
    if temperature > 0:
      self._generate = jax.jit(make_sampling_generate(self.model, self.max_new_tokens, eos,
                                                      temperature, top_p))
    else:
      greedy = jax.jit(generate_lib.make_generate(self.model, self.max_new_tokens, eos))
      self._generate = lambda params, batch, key: greedy(params, batch)
    self._key = jax.random.PRNGKey(seed)
    self.turns: list[dict[str, str]] = []
    self.image: np.ndarray | None = None

  def reset(self, image: np.ndarray) -> None:
    """Starts a new conversation about `image` (uint8 [S, S, 3])."""
    self.image, self.turns = image, []

  def _batch(self, ids: list[int], instruction: list[int]) -> dict[str, np.ndarray]:
    length = -(-len(ids) // LENGTH_BUCKET) * LENGTH_BUCKET
    n = len(ids)
    batch = {
        "input_ids": np.full((1, length), self.tokenizer.pad_id, np.int32),
        "attention_mask": np.zeros((1, length), np.int32),
        "loss_mask": np.zeros((1, length), np.int32),
        "instruction_mask": np.zeros((1, length), np.int32),
        "image": self.image[None], "has_image": np.ones((1,), bool),
    }
    batch["input_ids"][0, :n] = ids
    batch["attention_mask"][0, :n] = 1
    batch["instruction_mask"][0, :n] = instruction
    return batch

  def ask(self, question: str) -> Reply:
    """Answers `question` in the current conversation and appends both turns."""
    if self.image is None:
      raise AskError("no image: call reset(image) first")
    turns = self.turns + [{"from": "human", "value": question}]
    try:
      prompt = conversation_lib.tokenize_prompt(turns, self.tokenizer, self.template,
                                                has_image=True)
    except conversation_lib.ConversationError as e:
      raise AskError(f"cannot build the prompt: {e}") from None
    context = self.model.config.llm.max_position_embeddings
    needed = self.model.sequence_length(len(prompt)) + self.max_new_tokens
    if needed > context:
      raise AskError(f"the conversation needs {needed} positions, over the model's "
                     f"context of {context}; start a new one")
    batch = self._batch(prompt.input_ids, prompt.instruction_mask)
    self._key, key = jax.random.split(self._key)
    result = jax.device_get(self._generate(self.params, batch, key))
    answer_ids = []
    for token in np.asarray(result["tokens"])[0].tolist():
      if token in self.stop_ids:
        break
      answer_ids.append(token)
    answer = self.tokenizer.decode(answer_ids).strip()
    routing = None
    if self.model.config.llm.mmoe.enabled:
      # The routing each answer token got when generation fed it back (the stop token
      # and what follows it are not part of the answer).
      routing = np.asarray(result["top_expert"])[:, 0, :len(answer_ids)]
    if answer:  # an empty assistant turn is not a valid conversation turn
      self.turns = turns + [{"from": "gpt", "value": answer}]
    return Reply(answer, answer_ids, self.model.config.num_visual_tokens, routing,
                 self.model.config.llm.mmoe.num_experts)


def format_reply(reply: Reply, tokenizer=None) -> str:
  lines = [f"answer: {reply.answer}", f"visual tokens: {reply.num_visual_tokens}"]
  if reply.routing is None:
    lines.append("routing: none (this model has no MMoE-LLM)")
    return "\n".join(lines)
  n = reply.routing.shape[1]
  lines.append(f"routing of the {n} answer tokens (first-choice expert per MMoE-LLM layer; "
               f"{reply.num_experts} experts):")
  if tokenizer is not None and n:
    pieces = [tokenizer.decode([t]) or f"<{t}>" for t in reply.answer_ids]
    lines.append("  tokens:   " + " ".join(repr(p) for p in pieces))
  for layer, experts in enumerate(reply.routing):
    shares = np.bincount(experts, minlength=reply.num_experts) / max(n, 1)
    share_text = " ".join(f"e{e}={s:.0%}" for e, s in enumerate(shares))
    lines.append(f"  layer {layer:>2}: {share_text} | " + " ".join(str(e) for e in experts))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def run(config, workdir: str, image_path: str, question: str | None, stdin=None,
        out=None, **options) -> None:
  """The CLI body: one question, or a conversation read from `stdin`."""
  out = out or sys.stdout
  image = load_image(image_path, config.data)  # before the model: fail fast
  if not os.path.exists(workdir):
    raise AskError(f"checkpoint not found: {workdir}")
  run_record.check(config, workdir)  # the run's own tokenizer, template and shapes
  assistant = Assistant(config, workdir, **options)
  assistant.reset(image)
  if question is not None:
    print(format_reply(assistant.ask(question), assistant.tokenizer), file=out, flush=True)
    return
  stdin = stdin or sys.stdin
  interactive = stdin.isatty()
  while True:
    if interactive:
      print("USER: ", end="", file=out, flush=True)
    line = stdin.readline()
    if not line or not line.strip():
      break
    if not interactive:
      print(f"USER: {line.strip()}", file=out)
    print(format_reply(assistant.ask(line.strip()), assistant.tokenizer), file=out,
          flush=True)


def define_flags() -> dict[str, Any]:
  """The CLI's flags (defined only when run as a program, so importing defines none)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file (path:arg).",
                                                lock_config=False),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Run workdir, step directory or params-only checkpoint."),
      "image": flags.DEFINE_string("image", None, "The image to ask about."),
      "question": flags.DEFINE_string(
          "question", None, "The question; without it, questions come from stdin."),
      "max_new_tokens": flags.DEFINE_integer(
          "max_new_tokens", 0, "Answer length limit (0: the config's eval.max_new_tokens)."),
      "temperature": flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples."),
      "top_p": flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature)."),
      "seed": flags.DEFINE_integer("seed", 0, "PRNG seed for sampling."),
  }


def main(argv, options: dict[str, Any]):
  del argv
  logging.set_verbosity(logging.ERROR)
  for name in ("workdir", "image"):
    if not options[name].value:
      raise AskError(f"--{name} is required")
  if options["config"].value is None:
    raise AskError(f"--config is required: {options['workdir'].value} holds no run record "
                   "(config.json; a params-only checkpoint needs the model's config)")
  run(options["config"].value, options["workdir"].value, options["image"].value,
      options["question"].value, max_new_tokens=options["max_new_tokens"].value or None,
      temperature=options["temperature"].value, top_p=options["top_p"].value,
      seed=options["seed"].value)


if __name__ == "__main__":
  _options = define_flags()
  cli.run(lambda argv: main(argv, _options), prog="ask", saved_config=True)
