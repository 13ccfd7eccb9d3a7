"""MMMU (validation): MMMU's own multiple-choice and open-answer rules.

llava:   MMMU/*.jsonl or *.json records with the dataset's fields (id, question, options,
         answer, question_type, image_1 as a path relative to the folder).
parquet: lmms-lab/MMMU validation shards (id, question, options as a list literal,
         answer, question_type, subfield, image_1..image_7 embedded).
The model takes one image: questions with several use image_1 (the `<image k>` tags are
dropped from the text).
"""

import ast
import os
import re

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

_IMAGE_TAG = re.compile(r"<image \d+>")


def _list(value):
  if isinstance(value, str):
    value = ast.literal_eval(value) if value.strip() else []
  return [str(v) for v in value]


@base.register
class MMMU(base.Benchmark):
  name, title = "mmmu", "MMMU"
  folders = ("MMMU", "mmmu")

  def _sample(self, r, image):
    question = _IMAGE_TAG.sub("", r["question"]).strip()
    options = _list(r.get("options") or [])
    category = str(r.get("subfield", ""))
    if r.get("question_type", "multiple-choice") == "multiple-choice" and options:
      answer = base.letter_index(r["answer"], len(options))
      return base.choice_sample(r["id"], question, options, answer, image, "", category,
                                kind="multiple-choice")
    answers = r["answer"]
    if isinstance(answers, str) and answers.strip().startswith("["):
      answers = ast.literal_eval(answers)
    answers = [str(a) for a in (answers if isinstance(answers, list) else [answers])]
    return base.Sample(id=str(r["id"]), prompt=base.with_suffix(question, self.suffix),
                       image=image, target={"answers": answers, "category": category,
                                            "kind": "open"})

  def llava_records(self):
    path = self.first_existing(["*.jsonl", "*.json"])
    for r in base.load_records(path):
      yield path, str(r.get("id")), lambda r=r: self._sample(
          r, os.path.join(self.root, r["image_1"]))

  def parquet_sample(self, row):
    return self._sample(row, base.image_value(row["image_1"]))

  def _correct(self, record):
    t = record["target"]
    if t["kind"] == "open":
      return scoring.mmmu_open_correct(record["prediction"], t["answers"])
    letters = scoring.LETTERS[:len(t["options"])]
    return scoring.mmmu_multiple_choice(record["prediction"], letters, t["options"],
                                        record["id"]) == t["answers"][0]

  def score(self, records):
    return base.accuracy_by(records, self._correct, lambda r: r["target"]["category"])
