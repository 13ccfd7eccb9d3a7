"""GQA testdev-balanced: exact match after LLaVA's GQA normaliser.

llava:   GQA/llava_gqa_testdev_balanced.jsonl (question_id, image, text) + answers in
         GQA/testdev_balanced_questions.json ({qid: {'answer', ...}}) + GQA/images/.
parquet: lmms-lab/GQA: testdev_balanced_instructions shards (id, imageId, question,
         answer) and testdev_balanced_images shards (id, image), joined on the image id.
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class GQA(base.Benchmark):
  name, title = "gqa", "GQA"
  folders = ("GQA", "gqa")

  def _sample(self, qid, question, answer, image):
    return base.Sample(id=str(qid), prompt=base.with_suffix(question, self.suffix),
                       image=image, target={"answers": [answer]})

  def llava_records(self):
    questions = self.require("llava_gqa_testdev_balanced.jsonl")
    answers = base.load_json(self.require("testdev_balanced_questions.json"))
    image_dir = self.first_existing(["images", "."])
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
    return base.accuracy_by(records, lambda r: scoring.gqa_correct(
        r["prediction"], r["target"]["answers"][0]))
