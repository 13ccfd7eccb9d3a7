"""Conversation templates: exact layouts, label masks, instruction masks, placeholder."""

import pytest

from leo_mini_jax.data import conversation as conv
from leo_mini_jax.data import tokenizers as tokenizers_lib

PH = conv.IMAGE_PLACEHOLDER_ID
TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nWhat color is the shape?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And its shape?"},
    {"from": "gpt", "value": "a small circle"},
]
ANSWERS = ["red", "a small circle"]
USER_TEXTS = ["What color is the shape?", "And its shape?"]


def runs(ids, mask):
  """Contiguous runs of ids where mask == 1."""
  out, current = [], []
  for i, m in zip(ids, mask):
    if m:
      current.append(i)
    elif current:
      out.append(current)
      current = []
  if current:
    out.append(current)
  return out


def test_vicuna_v1_layout_matches_llava_prompt():
  tok = tokenizers_lib.ByteTokenizer()
  out = conv.tokenize_conversation(TWO_ROUNDS, tok, "vicuna_v1", has_image=True)
  # LLaVA-1.5's conv_vicuna_v1.get_prompt() with sep ' ' and sep2 '</s>'; '<image>' is
  # the placeholder id and BOS comes first.
  expected = ("<s>" + conv.VICUNA_SYSTEM + " USER: <image>\nWhat color is the shape? "
              "ASSISTANT: red</s>USER: And its shape? ASSISTANT: a small circle</s>")
  before, after = expected.split("<image>")
  assert out.input_ids.count(PH) == 1
  at = out.input_ids.index(PH)
  assert tok.decode(out.input_ids[:at], skip_special=False) == before
  assert tok.decode(out.input_ids[at + 1:], skip_special=False) == after
  prompt = conv.tokenize_prompt(TWO_ROUNDS[:1], tok, "vicuna_v1", has_image=True)
  assert tok.decode(prompt.input_ids, skip_special=False) == (
      "<s>" + conv.VICUNA_SYSTEM + " USER: \nWhat color is the shape? ASSISTANT:")


def test_llama3_layout_matches_chat_format():
  tok = tokenizers_lib.ByteTokenizer()
  out = conv.tokenize_conversation(TWO_ROUNDS, tok, "llama3", has_image=True)
  h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
  # EAGLE's conv_llama3 (eagle/conversation.py): the Vicuna system text in Llama-3 headers,
  # sep '<|eot_id|>' after the system text and after every message.
  eagle_system = ("A chat between a curious user and an artificial intelligence "
                  "assistant. The assistant gives helpful, detailed, and polite answers to "
                  "the user's questions.")
  expected = ("<s>" + h("system") + eagle_system + "<|eot_id|>" + h("user") +
              "\nWhat color is the shape?<|eot_id|>" + h("assistant") + "red<|eot_id|>" +
              h("user") + "And its shape?<|eot_id|>" + h("assistant") +
              "a small circle<|eot_id|>")
  assert tok.decode(out.input_ids, skip_special=False) == expected
  at = out.input_ids.index(PH)  # the placeholder comes right after the user header
  assert tok.decode(out.input_ids[:at], skip_special=False).endswith(
      "<|eot_id|>" + h("user"))
  prompt = conv.tokenize_prompt(TWO_ROUNDS[:3], tok, "llama3", has_image=True)
  assert tok.decode(prompt.input_ids, skip_special=False).endswith(
      "And its shape?<|eot_id|>" + h("assistant"))
  # LLaVA-NeXT's system text stays selectable by name, in the same layout.
  next_out = conv.tokenize_conversation(TWO_ROUNDS, tok, "llama3_llava_next",
                                        has_image=True)
  assert tok.decode(next_out.input_ids, skip_special=False) == expected.replace(
      eagle_system, conv.LLAVA_NEXT_LLAMA3_SYSTEM)


def test_plain_layout_is_image_caption_newline():
  tok = tokenizers_lib.ByteTokenizer()
  turns = [{"from": "human", "value": "<image>\nDescribe."},
           {"from": "gpt", "value": "a red circle"}]
  out = conv.tokenize_conversation(turns, tok, "plain", has_image=True)
  # LLaVA/EAGLE preprocess_plain: "<image>" + caption + conv_llava_plain.sep ("\n"), no
  # EOS; only the "<image>" prefix (BOS + placeholder) is masked.
  assert out.input_ids == [tok.bos_id, PH] + tok.encode("a red circle\n")
  assert tok.eos_id not in out.input_ids
  assert out.loss_mask == [0, 0] + [1] * len("a red circle\n")
  assert conv.get_template("plain").end_of_turn_id(tok) == tok.encode("\n")[0]
  assert not any(out.instruction_mask)
  assert conv.tokenize_prompt(turns[:1], tok, "plain", has_image=True).input_ids == \
      [tok.bos_id, PH]
  with pytest.raises(conv.ConversationError, match="one human and one gpt"):
    conv.tokenize_conversation(TWO_ROUNDS, tok, "plain", has_image=True)


def _tokenizer(name, request):
  if name == "byte":
    return tokenizers_lib.ByteTokenizer()
  return tokenizers_lib.load_hf_folder_tokenizer(request.getfixturevalue(name))[0]


TOKENIZERS = ["byte", "llama3_style_folder", "metaspace_folder", "sentencepiece_folder"]


@pytest.mark.parametrize("tokenizer_name, template", [
    *[(name, "vicuna_v1") for name in TOKENIZERS],
    ("byte", "llama3"), ("llama3_style_folder", "llama3"),  # vocabularies with the markers
    ("byte", "plain"), ("sentencepiece_folder", "plain")])
def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_name, template, request):
  tok = _tokenizer(tokenizer_name, request)
  tpl = conv.get_template(template)
  turns, answers, user_texts = TWO_ROUNDS, ANSWERS, USER_TEXTS
  if template == "plain":  # one caption; the human text is not part of the sequence
    turns, answers, user_texts = TWO_ROUNDS[:2], ANSWERS[:1], []
  out = conv.tokenize_conversation(turns, tok, tpl, has_image=True)
  assert len(out.input_ids) == len(out.loss_mask) == len(out.instruction_mask)
  loss_runs = runs(out.input_ids, out.loss_mask)
  assert len(loss_runs) == len(answers)
  for run, answer in zip(loss_runs, answers):
    assert run[-1] == tpl.end_of_turn_id(tok)  # the end-of-turn token is learned
    assert tok.decode(run[:-1]).strip() == answer
  instruction_runs = runs(out.input_ids, out.instruction_mask)
  # Default: only the first human turn (the one with the image) conditions CoTR/router.
  assert [tok.decode(r).strip() for r in instruction_runs] == user_texts[:1]
  every = conv.tokenize_conversation(turns, tok, tpl, has_image=True,
                                     instruction_turns="all")
  assert every.input_ids == out.input_ids and every.loss_mask == out.loss_mask
  every_runs = runs(every.input_ids, every.instruction_mask)
  assert [tok.decode(r).strip() for r in every_runs] == user_texts
  # Disjoint masks; the placeholder is in neither; exactly one placeholder.
  assert not any(l and i for l, i in zip(out.loss_mask, out.instruction_mask))
  at = out.input_ids.index(PH)
  assert out.loss_mask[at] == out.instruction_mask[at] == 0
  assert out.input_ids.count(PH) == 1


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "plain"])
def test_placeholder_once_for_images_never_for_text_only(template):
  tok = tokenizers_lib.ByteTokenizer()
  turns = TWO_ROUNDS[:2]
  with_marker = conv.tokenize_conversation(turns, tok, template, has_image=True)
  assert with_marker.input_ids.count(PH) == 1
  # An image record without a marker gets '<image>\n' prepended, as LLaVA does.
  no_marker = [{"from": "human", "value": "What color is the shape?"}, turns[1]]
  prepended = conv.tokenize_conversation(no_marker, tok, template, has_image=True)
  assert prepended.input_ids == with_marker.input_ids
  text_only = conv.tokenize_conversation(no_marker, tok, template, has_image=False)
  assert PH not in text_only.input_ids
  assert runs(text_only.input_ids, text_only.loss_mask) == \
      runs(with_marker.input_ids, with_marker.loss_mask)


@pytest.mark.parametrize("value", ["What color?\n<image>", "What <image>color? ",
                                   "<image>\n What color?", "<image> What color?<image>"])
def test_marker_moves_to_the_front_of_its_turn(value):
  # LLaVA/EAGLE preprocess_multimodal: "<image>\n" + value.replace("<image>", "").strip().
  tok = tokenizers_lib.ByteTokenizer()
  turns = [{"from": "human", "value": value}, {"from": "gpt", "value": "red"}]
  out = conv.tokenize_conversation(turns, tok, "vicuna_v1", has_image=True)
  reference = "<image>\n" + value.replace("<image>", "").strip()
  expected = conv.tokenize_conversation(
      [{"from": "human", "value": reference}, turns[1]], tok,
      conv.get_template("vicuna_v1", image_position="as_is"), has_image=True)
  assert out.input_ids == expected.input_ids
  at = out.input_ids.index(PH)
  assert tok.decode(out.input_ids[at - len(" USER: "):at]) == " USER: "
  assert tok.decode(out.input_ids[at + 1:at + 1 + len("\nWhat color?")]) == "\nWhat color?"
  assert out.input_ids.count(PH) == 1
  # Only the marker: the turn becomes "<image>" (the reference strips the trailing "\n").
  alone = conv.place_image_marker([("human", " <image>\n"), ("gpt", "x")], True)
  assert alone[0] == ("human", "<image>")
  with pytest.raises(ValueError, match="data.image_position"):
    conv.get_template("vicuna_v1", image_position="back")


def test_marker_at_the_end_of_the_question_stays_there_with_as_is():
  tok = tokenizers_lib.ByteTokenizer()
  turns = [{"from": "human", "value": "What color?\n<image>"}, {"from": "gpt", "value": "red"}]
  out = conv.tokenize_conversation(
      turns, tok, conv.get_template("vicuna_v1", image_position="as_is"), has_image=True)
  at = out.input_ids.index(PH)
  assert tok.decode(out.input_ids[at - len(" What color?\n"):at]) == " What color?\n"
  assert [tok.decode(r).strip() for r in runs(out.input_ids, out.instruction_mask)] == \
      ["What color?"]


@pytest.mark.parametrize("turns, has_image, message", [
    ([], True, "non-empty"),
    ([{"from": "gpt", "value": "x"}], False, "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, "alternate"),
    ([{"from": "human", "value": "a"}], False, "no assistant"),
    ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], False, "robot"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], False, "not a string"),
    ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"}], False,
     "without an image"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "b"}], True,
     "2 '<image>' markers"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}], True,
     "outside the first human turn"),
])
def test_malformed_conversations_are_named(turns, has_image, message):
  # 'as_is' refuses several markers; 'front' merges those of the first turn (reference).
  template = conv.get_template("vicuna_v1", image_position="as_is")
  with pytest.raises(conv.ConversationError, match=message):
    conv.tokenize_conversation(turns, tokenizers_lib.ByteTokenizer(), template,
                               has_image=has_image)


def test_fit_to_length_truncates_aligned_or_drops():
  tok = tokenizers_lib.ByteTokenizer()
  tpl = conv.get_template("vicuna_v1", system_prompt="")
  full = conv.tokenize_conversation(TWO_ROUNDS, tok, tpl, has_image=True)
  n = len(full)
  same, truncated = conv.fit_to_length(full, n, "drop")
  assert same is full and not truncated
  cut, truncated = conv.fit_to_length(full, n - 3, "truncate")
  assert truncated and cut.input_ids == full.input_ids[:n - 3]
  assert cut.loss_mask == full.loss_mask[:n - 3]
  assert cut.instruction_mask == full.instruction_mask[:n - 3]
  with pytest.raises(conv.ConversationError, match="overlong='drop'"):
    conv.fit_to_length(full, n - 1, "drop")
  first_answer = full.loss_mask.index(1)
  with pytest.raises(conv.ConversationError, match="every assistant token"):
    conv.fit_to_length(full, first_answer, "truncate")
  with pytest.raises(conv.ConversationError, match="image placeholder"):
    conv.fit_to_length(full, full.input_ids.index(PH), "truncate")
  prompt = conv.tokenize_prompt(TWO_ROUNDS[:1], tok, tpl, has_image=True)
  with pytest.raises(conv.ConversationError, match="prompt"):
    conv.fit_to_length(prompt, len(prompt) - 1, "truncate", prompt_only=True)


def test_system_prompt_override_and_unknown_template():
  tok = tokenizers_lib.ByteTokenizer()
  short = conv.tokenize_conversation(TWO_ROUNDS[:2], tok,
                                     conv.get_template("vicuna_v1", ""), has_image=True)
  assert tok.decode(short.input_ids, skip_special=False) == \
      "<s>USER: \nWhat color is the shape? ASSISTANT: red</s>"
  with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
    conv.get_template("chatml")


def test_split_for_generation_uses_the_first_gpt_turn_as_reference():
  prompt, reference = conv.split_for_generation(TWO_ROUNDS)
  assert prompt == TWO_ROUNDS[:1] and reference == "red"
  assert conv.split_for_generation(TWO_ROUNDS[:1]) == (TWO_ROUNDS[:1], None)
