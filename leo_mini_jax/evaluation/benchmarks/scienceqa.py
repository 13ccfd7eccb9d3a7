"""ScienceQA-IMG (test questions that have an image): option-letter accuracy by
lmms-eval's scienceqa_img rule (the answer is the letter, or starts "B."; 16 new tokens).

llava:   ScienceQA/problems.json ({pid: {question, choices, answer, hint, image, split}})
         + ScienceQA/pid_splits.json + ScienceQA/images/test/<pid>/<image>.
parquet: lmms-lab/ScienceQA 'ScienceQA-IMG' test shards (question, choices, answer,
         hint, image, subject, ...).
"""

import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class ScienceQA(base.Benchmark):
  name, title = "sqa", "SQA"
  folders = ("ScienceQA", "scienceqa", "SQA")
  column, max_new_tokens = 4, 16
  default_split = "test"  # the export also holds train and validation shards
  llava_files = "problems.json + pid_splits.json + images/test/<pid>/"

  def _sample(self, pid, r, image):
    hint = f"Context: {r['hint']}" if r.get("hint") else ""
    return base.choice_sample(pid, r["question"], list(r["choices"]), int(r["answer"]),
                              image, hint, str(r.get("subject", "")))

  def llava_records(self):
    path = self.require("problems.json")
    problems = base.load_json(path)
    splits = base.load_json(self.require("pid_splits.json"))
    for pid in splits[self.split or "test"]:
      def build(pid=pid):
        r = problems[pid]
        if not r.get("image"):
          return None  # text-only questions are not part of ScienceQA-IMG
        split_dir = r.get("split", self.split or "test")
        return self._sample(pid, r, self.where("images", split_dir, pid, r["image"]))
      yield path, pid, build

  def parquet_sample(self, row):
    if row.get("image") is None:
      return None
    self._count = getattr(self, "_count", -1) + 1
    return self._sample(str(row.get("id", self._count)), row, base.image_value(row["image"]))

  def score(self, records):
    return base.accuracy_by(records, lambda r: harness_rules.sqa_correct(
        r["prediction"], r["target"]["answers"][0]), lambda r: r["target"]["category"])
