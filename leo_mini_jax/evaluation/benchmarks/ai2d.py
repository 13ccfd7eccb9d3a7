"""AI2D (science diagrams, test): option-letter accuracy as lmms-eval's ai2d task scores
it (exact match with the letter, case and punctuation ignored; 16 new tokens).

llava:   AI2D/*.jsonl or *.json records {question_id?, question, options, answer (index
         or letter), image (path relative to the folder)}.
parquet: lmms-lab/ai2d (question, options, answer as an index string, image).
"""

import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class AI2D(base.Benchmark):
  name, title = "ai2d", "AI2D"
  column, max_new_tokens = 7, 16
  llava_files = "*.jsonl or *.json records (question, options, answer, image)"

  def _sample(self, index, r, image):
    options = list(r["options"])
    return base.choice_sample(r.get("question_id", index), r["question"], options,
                              base.letter_index(r["answer"], len(options)), image)

  def llava_records(self):
    path = self.first_existing(["*.jsonl", "*.json"])
    for index, r in enumerate(base.load_records(path)):
      yield path, str(r.get("question_id", f"#{index}")), lambda r=r, index=index: \
          self._sample(index, r, os.path.join(self.root, r["image"]))

  def parquet_sample(self, row):
    self._count = getattr(self, "_count", -1) + 1
    return self._sample(self._count, row, base.image_value(row["image"]))

  def score(self, records):
    return base.accuracy_by(records, lambda r: harness_rules.exact_match(
        r["prediction"], r["target"]["answers"][0]))
