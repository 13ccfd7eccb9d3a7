"""SEED-Bench, image questions only (SEED^I): option-letter accuracy by lmms-eval's
seedbench rule (the answer's first character is the letter; 1024 new tokens, the
harness default).

llava:   seed_bench/SEED-Bench.json ({'questions': [{question_id, question, choice_a..d,
         answer, data_id, data_type, question_type_id}]}) + seed_bench/SEED-Bench-image/
         (LLaVA's folder, beside its llava-seed-bench.jsonl; SEED-Bench/ is read too).
parquet: lmms-lab/SEED-Bench (same fields, image embedded as a list).
"""

import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation.benchmarks import base

CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


@base.register
class SEEDBench(base.Benchmark):
  name, title = "seed", "SEED^I"
  folders = ("seed_bench", "SEED-Bench", "SEED", "seedbench", "seed")
  column, max_new_tokens = 2, base.HARNESS_DEFAULT_LENGTH
  llava_files = "SEED-Bench.json + SEED-Bench-image/"

  def _sample(self, r, image):
    if r.get("data_type", "image") != "image":
      return None  # video questions are not part of SEED^I
    options = [r[c] for c in CHOICES]
    return base.choice_sample(r["question_id"], r["question"], options,
                              base.letter_index(r["answer"], len(options)), image(),
                              category=str(r.get("question_type_id", "")))

  def llava_records(self):
    path = self.require("SEED-Bench.json")
    data = base.load_json(path)
    image_dir = self.first_existing(["SEED-Bench-image", "images", "."])
    for r in data["questions"] if isinstance(data, dict) else data:
      yield path, str(r.get("question_id")), lambda r=r: self._sample(
          r, lambda: os.path.join(image_dir, r["data_id"]))

  def parquet_sample(self, row):
    return self._sample(row, lambda: base.image_value(row["image"]))

  def score(self, records):
    return base.accuracy_by(records, lambda r: harness_rules.seed_letter(
        r["prediction"]) == r["target"]["answers"][0], lambda r: r["target"]["category"])
