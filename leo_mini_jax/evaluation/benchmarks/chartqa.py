"""ChartQA (test, human + augmented): relaxed accuracy (5% numeric tolerance).

llava:   ChartQA/test/test_human.json and test_augmented.json ([{imgname, query, label}])
         + ChartQA/test/png/.
parquet: lmms-lab/ChartQA test shards (type, question, answer, image).
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class ChartQA(base.Benchmark):
  name, title = "chartqa", "ChartQA"
  suffix = "Answer the question with a single word."  # lmms-eval's ChartQA instruction
  column, max_new_tokens = 11, 16
  llava_files = "test/test_human.json + test/test_augmented.json + test/png/"

  def _sample(self, qid, question, answer, kind, image):
    return base.Sample(id=qid, prompt=base.with_suffix(question, self.suffix), image=image,
                       target={"answers": [str(answer)], "type": kind})

  def llava_records(self):
    for kind in ("human", "augmented"):
      path = self.first_existing([f"test/test_{kind}.json", f"test_{kind}.json"])
      image_dir = os.path.join(os.path.dirname(path), "png")
      for index, r in enumerate(base.load_records(path)):
        qid = f"{kind}/{index}"
        yield path, qid, lambda r=r, qid=qid, kind=kind: self._sample(
            qid, r["query"], r["label"], f"{kind}_test", os.path.join(image_dir, r["imgname"]))

  def parquet_sample(self, row):
    self._count = getattr(self, "_count", -1) + 1
    return self._sample(f"#{self._count}", row["question"], row["answer"], row["type"],
                        base.image_value(row["image"]))

  def score(self, records):
    return base.accuracy_by(records, lambda r: scoring.relaxed_correct(
        r["prediction"], r["target"]["answers"][0]), lambda r: r["target"]["type"])
