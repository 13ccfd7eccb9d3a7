"""GQA testdev-balanced: lmms-eval's exact match (case and punctuation ignored).

llava:   gqa/llava_gqa_testdev_balanced.jsonl (question_id, image, text) + answers in
         gqa/data/testdev_balanced_questions.json ({qid: {'answer', ...}}) + images in
         gqa/data/images/ (LLaVA's layout; the json and images/ beside the jsonl are read
         too).
parquet: lmms-lab/GQA: testdev_balanced_instructions shards (id, imageId, question,
         answer) and testdev_balanced_images shards (id, image), joined on the image id.
"""

import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class GQA(base.Benchmark):
  name, title = "gqa", "GQA"
  column, max_new_tokens = 3, 16
  llava_files = ("llava_gqa_testdev_balanced.jsonl + data/testdev_balanced_questions.json "
                 "+ data/images/")

  def _sample(self, qid, question, answer, image):
    return base.Sample(id=str(qid), prompt=base.with_suffix(question, self.suffix),
                       image=image, target={"answers": [answer]})

  def llava_records(self):
    questions = self.require("llava_gqa_testdev_balanced.jsonl")
    answers = base.load_json(self.first_existing(["data/testdev_balanced_questions.json",
                                                  "testdev_balanced_questions.json"]))
    image_dir = self.first_existing(["data/images", "images", "."])
    for r in base.load_records(questions):
      qid = str(r.get("question_id"))
      yield questions, qid, lambda r=r, qid=qid: self._sample(
          qid, r["text"], answers[qid]["answer"], os.path.join(image_dir, r["image"]))

  def _parquet_items(self, shards):
    is_images = lambda s: "images" in os.path.relpath(s, self.root)
    images = {}
    for _, _, row in base.iter_parquet([s for s in shards if is_images(s)]):
      images[str(row["id"])] = row["image"]
    for path, index, row in base.iter_parquet([s for s in shards if not is_images(s)]):
      yield path, str(row.get("id", f"#{index}")), lambda row=row: self._sample(
          row["id"], row["question"], row["answer"],
          base.image_value(images[str(row["imageId"])]))

  def score(self, records):
    return base.accuracy_by(records, lambda r: harness_rules.exact_match(
        r["prediction"], r["target"]["answers"][0]))
