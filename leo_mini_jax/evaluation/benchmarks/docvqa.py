"""DocVQA (val): ANLS as lmms-eval computes it (the single-word instruction, 32 new tokens).

llava:   DocVQA/val/val_v1.0.json or val_v1.0_withQT.json ({'data': [{questionId,
         question, image: 'documents/<name>.png', answers}]}), images relative to the JSON.
parquet: lmms-lab/DocVQA 'DocVQA' validation shards (questionId, question, answers, image).
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class DocVQA(base.Benchmark):
  name, title = "docvqa", "DocVQA"
  column, max_new_tokens = 10, 32
  default_split = "validation"
  llava_files = "val/val_v1.0.json (or val_v1.0_withQT.json) + val/documents/"

  def _sample(self, r, image):
    answers = r.get("answers")
    return base.Sample(id=str(r["questionId"]), image=image,
                       prompt=base.with_suffix(r["question"], self.suffix),
                       target={"answers": [str(a) for a in answers]} if answers else {})

  def llava_records(self):
    split = self.split or "val"
    path = self.first_existing([f"{split}/{split}_v1.0_withQT.json", f"{split}/{split}_v1.0.json",
                                f"{split}_v1.0_withQT.json", f"{split}_v1.0.json"])
    folder = os.path.dirname(path)
    for r in base.load_records(path):
      yield path, str(r.get("questionId")), lambda r=r: self._sample(
          r, os.path.join(folder, r["image"]))

  def parquet_sample(self, row):
    return self._sample(row, base.image_value(row["image"]))

  def score(self, records):
    return base.score_vqa(records, scoring.anls)

  def write_submission(self, records, out_dir):
    rows = [{"questionId": int(r["id"]) if r["id"].isdigit() else r["id"],
             "answer": r["prediction"]} for r in records if "answers" not in r["target"]]
    return base.write_json_submission(os.path.join(out_dir, "docvqa_test_submission.json"),
                                      rows)
