"""MMMU (validation): MMMU's own multiple-choice and open-answer rules.

llava:   MMMU/*.jsonl or *.json records with the dataset's fields (id, question, options,
         answer, question_type, image_1 as a path relative to the folder).
parquet: lmms-lab/MMMU validation shards (id, question, options as a list literal,
         answer, question_type, subfield, image_1..image_7 embedded).
Prompt as lmms-eval's mmmu_val task: the question, lettered options and "Answer with the
option letter from the given choices directly." (open questions: the single-word
instruction); `<image k>` tags become the image marker in place, as lmms-eval's
replace_images_tokens does. The model takes one image: the first tag's image sits at that
tag, later tags are removed (lmms-eval feeds one image per tag). 16 new tokens.
"""

import ast
import os
import re

from leo_mini_jax.data import conversation
from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

_IMAGE_TAG = re.compile(r"<image (\d+)>")
MULTI_CHOICE_PROMPT = "Answer with the option letter from the given choices directly."
IMAGE_MARKER = conversation.IMAGE_MARKER


def place_image(text: str) -> tuple[str, int]:
  """(text with its first `<image k>` tag as the image marker and later tags removed, k);
  a text without tags gets no marker (the template puts it in front) and image 1."""
  first = _IMAGE_TAG.search(text)
  if first is None:
    return text, 1
  before, after = text[:first.start()], text[first.end():]
  return before + IMAGE_MARKER + _IMAGE_TAG.sub("", after), int(first.group(1))


def _list(value):
  if isinstance(value, str):
    value = ast.literal_eval(value) if value.strip() else []
  return [str(v) for v in value]


@base.register
class MMMU(base.Benchmark):
  name, title = "mmmu", "MMMU"
  column, max_new_tokens = 5, 16
  default_split = "validation"
  llava_files = "*.jsonl or *.json with the dataset's fields, image_k as file paths"

  def _sample(self, r, image_of):
    """lmms-eval's mmmu construct_prompt + replace_images_tokens; `image_of(k)` is the
    source of the record's image_k."""
    options = _list(r.get("options") or [])
    category = str(r.get("subfield", ""))
    multiple_choice = r.get("question_type", "multiple-choice") == "multiple-choice"
    if multiple_choice and options:
      text = f"{r['question']}\n{base.options_block(options)}\n{MULTI_CHOICE_PROMPT}"
    else:
      text = f"{r['question']}\n{base.SINGLE_WORD}"
    prompt, first = place_image(text)
    image = image_of(first)
    if multiple_choice and options:
      answer = base.letter_index(r["answer"], len(options))
      return base.Sample(id=str(r["id"]), prompt=prompt, image=image,
                         target={"answers": [chr(65 + answer)], "options": options,
                                 "category": category, "kind": "multiple-choice"})
    answers = r["answer"]
    if isinstance(answers, str) and answers.strip().startswith("["):
      answers = ast.literal_eval(answers)
    answers = [str(a) for a in (answers if isinstance(answers, list) else [answers])]
    return base.Sample(id=str(r["id"]), prompt=prompt, image=image,
                       target={"answers": answers, "category": category, "kind": "open"})

  def llava_records(self):
    path = self.first_existing(["*.jsonl", "*.json"])
    for r in base.load_records(path):
      yield path, str(r.get("id")), lambda r=r: self._sample(
          r, lambda k: os.path.join(self.root, r[f"image_{k}"]))

  def parquet_sample(self, row):
    return self._sample(row, lambda k: base.image_value(row[f"image_{k}"]))

  def _correct(self, record):
    t = record["target"]
    if t["kind"] == "open":
      return scoring.mmmu_open_correct(record["prediction"], t["answers"])
    letters = scoring.LETTERS[:len(t["options"])]
    return scoring.mmmu_multiple_choice(record["prediction"], letters, t["options"],
                                        record["id"]) == t["answers"][0]

  def score(self, records):
    return base.accuracy_by(records, self._correct, lambda r: r["target"]["category"])
