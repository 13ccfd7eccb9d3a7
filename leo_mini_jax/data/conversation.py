"""Conversation templates: LLaVA-format turns → token ids with exact label masks.

A record's `conversations` is a list of turns {'from': 'human'|'gpt', 'value': str}. A
template lays the turns out as a list of *segments*, each tagged with who it belongs to:

  scaffold   template text and special tokens (system prompt, role headers, BOS, ...)
  user       the text of a human message
  assistant  the text of a gpt message and its end-of-turn token
  image      the `<image>` marker, which becomes one IMAGE_PLACEHOLDER_ID token

Each segment is tokenized on its own (tokenizers encode text as a continuation, see
tokenizers.py) and the ids are concatenated, so the masks are exact by construction:

  loss_mask         1 on assistant segments (message tokens + end-of-turn token)
  instruction_mask  1 on user segments (message text only; never scaffolding, never the
                    placeholder, never whitespace-only pieces next to the marker) of the
                    first human turn (the one with the image) by default; with
                    instruction_turns='all', of every human turn

CoTR and the MMoE router read the instruction mask over the whole row. Marking later
questions would let the visual tokens and routing of answer 1 depend on question 2 (the
future of the sequence), and evaluation only ever has the first question; so the default
conditions on the first user turn only (`data.instruction_turns`).

The templates (vicuna_v1, llama3, llama3_llava_next, plain) and the `<image>` position
choice are in templates.py; this module normalises turns, places the marker and encodes.
"""

import dataclasses
from typing import Any, Sequence

from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID  # pylint: disable=unused-import (re-exported)
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.data.templates import (  # pylint: disable=unused-import (re-exported)
    IMAGE_MARKER, IMAGE_POSITIONS, LLAVA_NEXT_LLAMA3_SYSTEM, TEMPLATES, VICUNA_SYSTEM,
    ConversationError, Llama3, LlavaNextLlama3, Plain, Segment, Template, VicunaV1,
    Turn, check_image_position, get_template, token_id)

INSTRUCTION_TURNS = ("first", "all")

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class LengthError(ConversationError):
  """A record that cannot be fitted to max_length; `length` is its full token count."""

  def __init__(self, message: str, length: int):
    super().__init__(message)
    self.length = length


@dataclasses.dataclass
class Tokenized:
  """Token ids and per-token masks (Python int lists of equal length)."""
  input_ids: list[int]
  loss_mask: list[int]
  instruction_mask: list[int]

  def __len__(self) -> int:
    return len(self.input_ids)

  def truncate(self, max_length: int) -> "Tokenized":
    return Tokenized(self.input_ids[:max_length], self.loss_mask[:max_length],
                     self.instruction_mask[:max_length])



def normalize_turns(turns: Any) -> list[Turn]:
  """Checks the LLaVA turn list: starts with human, alternates, values are strings."""
  if not isinstance(turns, (list, tuple)) or not turns:
    raise ConversationError("'conversations' must be a non-empty list of turns")
  out = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise ConversationError(f"turn {i} is not a {{'from', 'value'}} dict")
    role = _ROLE_ALIASES.get(turn["from"])
    if role is None:
      raise ConversationError(f"turn {i} has unknown role {turn['from']!r}")
    if not isinstance(turn["value"], str):
      raise ConversationError(
          f"turn {i} value is a {type(turn['value']).__name__}, not a string")
    if role == "gpt" and not turn["value"].strip():
      raise ConversationError(f"turn {i} (gpt) is empty: nothing to learn")
    expected = "human" if i % 2 == 0 else "gpt"
    if role != expected:
      raise ConversationError(
          f"turns do not alternate human/gpt: turn {i} is {role}, expected {expected}")
    out.append((role, turn["value"]))
  return out


def marker_to_front(text: str) -> str:
  """LLaVA/EAGLE's preprocess_multimodal: every marker removed, one put first."""
  return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def place_image_marker(turns: Sequence[Turn], has_image: bool,
                       image_position: str = "front") -> list[Turn]:
  """Ensures exactly one `<image>` marker, in the first human turn, iff there is an image.

  An image record without a marker gets "<image>\\n" prepended to its first human turn
  (as LLaVA does). image_position='front' then moves the marker to the front of that turn
  (several markers in it become one, as in the reference); 'as_is' leaves it in place and
  refuses several.
  """
  check_image_position(image_position)
  turns = list(turns)
  count = sum(value.count(IMAGE_MARKER) for _, value in turns)
  if not has_image:
    if count:
      raise ConversationError(f"{IMAGE_MARKER!r} marker in a record without an image")
    if not turns[0][1].strip():
      raise ConversationError("turn 0 (human) is empty and the record has no image")
    return turns
  in_first = turns[0][1].count(IMAGE_MARKER)
  if count == 0:
    turns[0] = (turns[0][0], IMAGE_MARKER + "\n" + turns[0][1])
  elif in_first < count:
    raise ConversationError(f"{IMAGE_MARKER!r} marker outside the first human turn")
  elif count > 1 and image_position == "as_is":
    raise ConversationError(f"{count} {IMAGE_MARKER!r} markers; one image per record")
  if image_position == "front":
    turns[0] = (turns[0][0], marker_to_front(turns[0][1]))
  return turns


def check_instruction_turns(instruction_turns: str) -> str:
  if instruction_turns not in INSTRUCTION_TURNS:
    raise ValueError(f"data.instruction_turns must be one of {INSTRUCTION_TURNS}, got "
                     f"{instruction_turns!r}")
  return instruction_turns


def encode_segments(segments: Sequence[Segment], tokenizer: tokenizers_lib.Tokenizer,
                    instruction_turns: str = "first") -> Tokenized:
  """Concatenates per-segment ids; masks follow each segment's role.

  instruction_turns: 'first' marks the user text of the first human turn only, 'all'
  that of every human turn.
  """
  every_turn = check_instruction_turns(instruction_turns) == "all"
  ids, loss, instruction = [], [], []
  for segment in segments:
    if segment.image:
      piece = [IMAGE_PLACEHOLDER_ID]
    elif segment.token is not None:
      if segment.token == "bos" and tokenizer.bos_id is None:
        continue  # tokenizers without BOS simply start with the text
      piece = [token_id(tokenizer, segment.token)]
    else:
      piece = tokenizer.encode(segment.text)
    ids += piece
    loss += [int(segment.role == "assistant")] * len(piece)
    is_instruction = segment.role == "user" and (every_turn or segment.turn == 0)
    instruction += [int(is_instruction)] * len(piece)
  return Tokenized(ids, loss, instruction)


def tokenize_conversation(turns: Any, tokenizer: tokenizers_lib.Tokenizer,
                          template: "str | Template", *, has_image: bool,
                          instruction_turns: str = "first") -> Tokenized:
  """Full conversation for training: ids, loss mask, instruction mask.

  Raises ConversationError when the turns are malformed or hold no gpt turn.
  """
  template = get_template(template)
  turns = place_image_marker(normalize_turns(turns), has_image, template.image_position)
  if not any(role == "gpt" for role, _ in turns):
    raise ConversationError("no assistant (gpt) turn")
  return encode_segments(template.layout(turns, False, has_image), tokenizer,
                         instruction_turns)


def tokenize_prompt(turns: Any, tokenizer: tokenizers_lib.Tokenizer,
                    template: "str | Template", *, has_image: bool,
                    instruction_turns: str = "first",
                    image_position: str | None = None) -> Tokenized:
  """Generation prompt: the turns (ending with a human turn) + the assistant header.

  `image_position` overrides the template's (None keeps it).
  """
  template = get_template(template)
  turns = place_image_marker(normalize_turns(turns), has_image,
                             image_position or template.image_position)
  if turns[-1][0] != "human":
    raise ConversationError("a generation prompt must end with a human turn")
  return encode_segments(template.layout(turns, True, has_image), tokenizer,
                         instruction_turns)


def split_for_generation(turns: Any) -> tuple[list[dict], str | None]:
  """(turns before the first gpt turn, that gpt turn's text as the reference or None)."""
  turns = list(turns)
  for i, turn in enumerate(turns):
    if isinstance(turn, dict) and _ROLE_ALIASES.get(turn.get("from")) == "gpt":
      return turns[:i], turn.get("value")
  return turns, None


def extra_visual_tokens(tokenized: Tokenized, visual_tokens: int) -> int:
  """Positions the image adds to the LLM sequence beyond its one placeholder token."""
  return visual_tokens - 1 if IMAGE_PLACEHOLDER_ID in tokenized.input_ids else 0


def fit_to_length(tokenized: Tokenized, max_length: int, overlong: str, *,
                  prompt_only: bool = False, visual_tokens: int = 1
                  ) -> tuple[Tokenized, bool]:
  """(tokens that fit in `max_length`, whether they were truncated).

  visual_tokens: what the image placeholder counts as. 1 counts text tokens only; N^V
  makes max_length bound the LLM sequence (text + visual tokens), as EAGLE/LLaVA cut the
  embedded sequence to model_max_length, so an image row keeps max_length − (N^V − 1)
  text tokens.
  overlong='truncate' cuts the tail (masks stay aligned, they are cut with the ids);
  'drop' rejects the record. Raises ConversationError when the record cannot be used:
  dropped, truncated past the image placeholder or past every assistant token, or a
  generation prompt that does not fit (cutting it would remove the assistant header).
  """
  if overlong not in ("truncate", "drop"):
    raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
  extra = extra_visual_tokens(tokenized, visual_tokens)
  n, budget = len(tokenized) + extra, max_length - extra
  if n <= max_length:
    return tokenized, False
  what = f"{n} tokens" + (f" ({visual_tokens} of them visual)" if extra else "")
  if prompt_only:
    raise LengthError(f"prompt of {what} exceeds max_length {max_length}", n)
  if overlong == "drop":
    raise LengthError(f"{what} exceed max_length {max_length} (overlong='drop')", n)
  cut = tokenized.truncate(max(budget, 0))
  if (IMAGE_PLACEHOLDER_ID in tokenized.input_ids
      and IMAGE_PLACEHOLDER_ID not in cut.input_ids):
    raise LengthError(
        f"{what}: truncation to max_length {max_length} removes the image "
        "placeholder", n)
  if not any(cut.loss_mask):
    raise LengthError(
        f"{what}: truncation to max_length {max_length} removes every assistant "
        "token", n)
  return cut, True


def tokenize_full(conversations: Any, has_image: bool,
                  tokenizer: tokenizers_lib.Tokenizer, template: "str | Template", *,
                  prompt_only: bool = False, instruction_turns: str = "first") -> Tokenized:
  """A record's tokens before any length limit (the generation prompt with prompt_only:
  the turns before the first gpt turn + the assistant header)."""
  if prompt_only:
    turns, _ = split_for_generation(conversations)
    return tokenize_prompt(turns, tokenizer, template, has_image=has_image,
                           instruction_turns=instruction_turns)
  return tokenize_conversation(conversations, tokenizer, template, has_image=has_image,
                               instruction_turns=instruction_turns)


def tokenize_record(conversations: Any, has_image: bool,
                    tokenizer: tokenizers_lib.Tokenizer, template: "str | Template",
                    max_length: int, overlong: str, prompt_only: bool = False,
                    instruction_turns: str = "first", visual_tokens: int = 1
                    ) -> tuple[Tokenized, bool]:
  """A record's tokens fitted to `max_length` (see fit_to_length): (tokens, truncated).

  prompt_only builds the generation prompt from the turns before the first gpt turn.
  Raises ConversationError (a ValueError) naming why a record is unusable.
  """
  tokenized = tokenize_full(conversations, has_image, tokenizer, template,
                            prompt_only=prompt_only, instruction_turns=instruction_turns)
  return fit_to_length(tokenized, max_length, overlong, prompt_only=prompt_only,
                       visual_tokens=visual_tokens)
