"""Conversation templates: how normalised turns are laid out as segments.

Templates (data.template):
  vicuna_v1  LLaVA-1.5: "<s>SYSTEM USER: <msg> ASSISTANT: <answer></s>USER: ..."
  llama3     Llama-3 chat as EAGLE's conv_llama3: "<|begin_of_text|><|start_header_id|>
             system<|end_header_id|>\\n\\nSYSTEM<|eot_id|><|start_header_id|>user
             <|end_header_id|>\\n\\n<msg><|eot_id|><|start_header_id|>assistant
             <|end_header_id|>\\n\\n<answer><|eot_id|>" with the Vicuna system text (what
             EAGLE's Llama-3 releases were trained with)
  llama3_llava_next  the same layout with LLaVA-NeXT's Llama-3 system text
  plain      stage-1 captions as LLaVA/EAGLE's preprocess_plain: "<s><image><caption>\\n"
             (the caption ends with the template's separator "\\n", not EOS); the human
             text is ignored and the loss covers the caption and the "\\n".

Image marker position (`image_position`, data.image_position): 'front' normalises the
turn holding `<image>` the way LLaVA/EAGLE's preprocess_multimodal does,
"<image>\\n" + text.replace("<image>", "").strip(), so the question always follows the
image (as in evaluation prompts); 'as_is' keeps the marker where the record puts it
(conversation.place_image_marker applies it).

conversation.py encodes the segments and builds the masks.
"""

import dataclasses
from typing import Sequence

from leo_mini_jax.data import tokenizers as tokenizers_lib

IMAGE_MARKER = "<image>"
IMAGE_POSITIONS = ("front", "as_is")
Turn = tuple[str, str]  # (role 'human' | 'gpt', text)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions.")
# LLaVA-NeXT's Llama-3 system prompt (template 'llama3_llava_next'). EAGLE's conv_llama3,
# which its Llama-3 releases were trained with, uses VICUNA_SYSTEM.
LLAVA_NEXT_LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language.")


class ConversationError(ValueError):
  """A record's conversation cannot be laid out (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Segment:
  """One piece of a laid-out conversation: text to encode, a named token, or the image."""
  role: str  # 'scaffold' | 'user' | 'assistant'
  text: str = ""
  token: str | None = None  # 'bos', 'eos' or a special string such as '<|eot_id|>'
  image: bool = False
  turn: int = 0  # index of the human turn a user segment belongs to (0 = the first)


def check_image_position(image_position: str) -> str:
  if image_position not in IMAGE_POSITIONS:
    raise ValueError(f"data.image_position must be one of {IMAGE_POSITIONS}, got "
                     f"{image_position!r}")
  return image_position


def user_segments(text: str, turn: int) -> list[Segment]:
  """A human message split at the image marker; whitespace-only pieces are scaffolding.

  `turn` counts human turns (0 = the first).
  """
  segments = []
  pieces = text.split(IMAGE_MARKER)
  for i, piece in enumerate(pieces):
    if piece:
      segments.append(Segment("user" if piece.strip() else "scaffold", text=piece,
                              turn=turn))
    if i < len(pieces) - 1:
      segments.append(Segment("scaffold", image=True))
  return segments


class Template:
  """Lays out normalized turns as segments. Subclasses define `name` and `layout`."""
  name: str = ""
  end_of_turn: str = "eos"  # the token that ends an assistant turn (and generation)

  def __init__(self, image_position: str = "front"):
    self.image_position = check_image_position(image_position)

  def layout(self, turns: Sequence[Turn], prompt_only: bool,
             has_image: bool) -> list[Segment]:
    """Segments for normalized turns; with prompt_only, ends with the assistant header."""
    raise NotImplementedError

  def end_of_turn_id(self, tokenizer: tokenizers_lib.Tokenizer) -> int:
    """Id that closes an assistant turn: generation stops on it."""
    return token_id(tokenizer, self.end_of_turn)

  def __repr__(self):
    return f"{type(self).__name__}(image_position={self.image_position!r})"


class VicunaV1(Template):
  """LLaVA-1.5's conv_vicuna_v1 (sep ' ', sep2 '</s>')."""
  name = "vicuna_v1"

  def __init__(self, system: str = VICUNA_SYSTEM, image_position: str = "front"):
    super().__init__(image_position)
    self.system = system

  def layout(self, turns, prompt_only, has_image):
    segments = [Segment("scaffold", token="bos")]
    if self.system:
      segments.append(Segment("scaffold", text=self.system))
    for i, (role, value) in enumerate(turns):
      if role == "human":
        # After the system prompt the separator is ' '; after '</s>' it is nothing.
        sep = " " if i == 0 and self.system else ""
        segments.append(Segment("scaffold", text=sep + "USER:"))
        segments += user_segments(" " + value, i // 2)
      else:
        segments.append(Segment("scaffold", text=" ASSISTANT:"))
        segments.append(Segment("assistant", text=" " + value))
        segments.append(Segment("assistant", token="eos"))
    if prompt_only:
      segments.append(Segment("scaffold", text=" ASSISTANT:"))
    return segments


class Llama3(Template):
  """Llama-3 chat format with a system turn: EAGLE's conv_llama3 (Vicuna system text)."""
  name = "llama3"
  end_of_turn = "<|eot_id|>"
  default_system = VICUNA_SYSTEM

  def __init__(self, system: str | None = None, image_position: str = "front"):
    super().__init__(image_position)
    self.system = self.default_system if system is None else system

  @staticmethod
  def _header(role: str) -> list[Segment]:
    return [Segment("scaffold", token="<|start_header_id|>"), Segment("scaffold", text=role),
            Segment("scaffold", token="<|end_header_id|>"), Segment("scaffold", text="\n\n")]

  def layout(self, turns, prompt_only, has_image):
    segments = [Segment("scaffold", token="bos")]
    if self.system:  # Llama-3's chat template omits the system turn when it is empty
      segments += self._header("system")
      segments += [Segment("scaffold", text=self.system),
                   Segment("scaffold", token="<|eot_id|>")]
    for i, (role, value) in enumerate(turns):
      if role == "human":
        segments += self._header("user")
        segments += user_segments(value, i // 2)
        segments.append(Segment("scaffold", token="<|eot_id|>"))
      else:
        segments += self._header("assistant")
        segments.append(Segment("assistant", text=value))
        segments.append(Segment("assistant", token="<|eot_id|>"))
    if prompt_only:
      segments += self._header("assistant")
    return segments


class LlavaNextLlama3(Llama3):
  """The Llama-3 layout with LLaVA-NeXT's system text."""
  name = "llama3_llava_next"
  default_system = LLAVA_NEXT_LLAMA3_SYSTEM


class Plain(Template):
  """Stage-1 captioning: BOS, the image, the first gpt turn as caption, then "\\n".

  LLaVA/EAGLE's preprocess_plain builds "<image>" + caption + sep with conv_llava_plain's
  sep "\\n" and no EOS; the caption and the "\\n" are learned (encoded together, as the
  reference tokenizes the whole string). Generation stops on that newline.
  """
  name = "plain"
  separator = "\n"

  def layout(self, turns, prompt_only, has_image):
    segments = [Segment("scaffold", token="bos")]
    if has_image:
      segments.append(Segment("scaffold", image=True))
    if prompt_only:
      return segments
    if len(turns) != 2:
      raise ConversationError(
          f"the 'plain' template needs one human and one gpt turn, got {len(turns)} turns")
    segments.append(Segment("assistant", text=turns[1][1] + self.separator))
    return segments

  def end_of_turn_id(self, tokenizer: tokenizers_lib.Tokenizer) -> int:
    """The separator's id when it is one token (it is for byte-fallback and byte-level
    vocabularies), else EOS."""
    ids = tokenizer.encode(self.separator)
    return ids[0] if len(ids) == 1 else tokenizer.eos_id


TEMPLATES = {"vicuna_v1": VicunaV1, "llama3": Llama3,
             "llama3_llava_next": LlavaNextLlama3, "plain": Plain}


def get_template(template: "str | Template", system_prompt: str | None = None,
                 image_position: str = "front") -> Template:
  """A template by name. `system_prompt`, if not None, replaces the default system text
  ('' drops it: short sequences for tiny models); 'plain' has no system text.
  `image_position`: 'front' | 'as_is' (see the module docstring).
  """
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"unknown conversation template {template!r}; known: "
                     f"{sorted(TEMPLATES)}")
  cls = TEMPLATES[template]
  if system_prompt is None or cls is Plain:
    return cls(image_position=image_position)
  return cls(system=system_prompt, image_position=image_position)


def token_id(tokenizer: tokenizers_lib.Tokenizer, token: str) -> int:
  if token == "bos":
    if tokenizer.bos_id is None:
      raise ConversationError(f"{tokenizer!r} has no BOS token")
    return tokenizer.bos_id
  if token == "eos":
    return tokenizer.eos_id
  return tokenizer.special_id(token)
