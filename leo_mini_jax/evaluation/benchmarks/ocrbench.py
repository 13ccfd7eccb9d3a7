"""OCRBench (1000 questions, 10 question types): substring matching, category totals.

llava:   OCRBench/OCRBench.json ([{id, dataset_name, question, answers, type,
         image_path}]) + OCRBench/OCRBench_Images/ (image_path relative to the folder).
parquet: echo840/OCRBench (dataset, question, question_type, answer, image).
The question is asked as it is (no instruction is appended), as OCRBench and lmms-eval's
ocrbench task do; 128 new tokens (lmms-eval).
"""

import collections
import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class OCRBench(base.Benchmark):
  name, title = "ocrbench", "OCRBench"
  suffix = ""
  column, max_new_tokens = 12, 128
  llava_files = "OCRBench.json + OCRBench_Images/"

  def _sample(self, qid, question, answers, kind, image):
    answers = [answers] if isinstance(answers, str) else list(answers)
    return base.Sample(id=str(qid), prompt=question.strip(), image=image,
                       target={"answers": [str(a) for a in answers], "type": kind})

  def llava_records(self):
    path = self.first_existing(["OCRBench.json", "*.json"])
    for index, r in enumerate(base.load_records(path)):
      qid = str(r.get("id", index))
      yield path, qid, lambda r=r, qid=qid: self._sample(
          qid, r["question"], r["answers"], r["type"],
          os.path.normpath(os.path.join(self.root, r["image_path"])))

  def parquet_sample(self, row):
    self._count = getattr(self, "_count", -1) + 1
    return self._sample(self._count, row["question"], row["answer"], row["question_type"],
                        base.image_value(row["image"]))

  def score(self, records):
    correct = collections.Counter()
    for r in records:
      kind = r["target"]["type"]
      correct[kind] += scoring.ocrbench_correct(r["prediction"], r["target"]["answers"], kind)
    totals = scoring.ocrbench_totals(correct)
    return {"score": totals["Final Score"], "categories": totals,
            "num_questions": len(records)}
