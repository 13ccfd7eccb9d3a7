"""MME (perception and cognition, 14 yes/no subtasks): score = acc + acc+ per subtask.

llava:   MME/MME_Benchmark_release_version/<subtask>/ (the release may hold one more level,
         MME_Benchmark_release_version/MME_Benchmark/<subtask>/) with images and
         `question<TAB>answer` .txt files (either beside the images or in images/ +
         questions_answers_YN/).
parquet: lmms-lab/MME (question_id, image, question, answer, category).
Prompt as lmms-eval's mme task: " Please answer yes or no." removed, then the
single-word instruction; 16 new tokens.
"""

import glob
import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

YES_NO = " Please answer yes or no."  # MME's own instruction, replaced by the suffix


@base.register
class MME(base.Benchmark):
  name, title = "mme", "MME^P"
  folders = ("MME", "mme")
  column, max_new_tokens = 0, 16
  llava_files = "MME_Benchmark_release_version/[MME_Benchmark/]<subtask>/*.txt + images"

  def _sample(self, image_name, index, question, answer, category, image):
    return base.Sample(
        id=f"{category}/{image_name}#{index}",
        prompt=base.with_suffix(question.strip().replace(YES_NO, ""), self.suffix),
        image=image, target={"answers": [answer.strip()], "category": category,
                             "image": image_name})

  def llava_records(self):
    release = self.first_existing(["MME_Benchmark_release_version/MME_Benchmark",
                                   "MME_Benchmark_release_version", "MME_Benchmark", "."])
    for task_dir in sorted(p for p in glob.glob(os.path.join(release, "*")) if os.path.isdir(p)):
      category = os.path.basename(task_dir)
      qa_dir = os.path.join(task_dir, "questions_answers_YN")
      image_dir = os.path.join(task_dir, "images")
      if not os.path.isdir(qa_dir):
        qa_dir = image_dir = task_dir
      for txt in sorted(glob.glob(os.path.join(qa_dir, "*.txt"))):
        stem = os.path.splitext(os.path.basename(txt))[0]
        images = [p for p in glob.glob(os.path.join(image_dir, stem + ".*"))
                  if not p.endswith(".txt")]
        with open(txt) as f:
          lines = [line for line in f.read().splitlines() if line.strip()]
        for index, line in enumerate(lines):
          def build(line=line, index=index, images=images, stem=stem, category=category):
            question, sep, answer = line.partition("\t")
            if not sep:
              raise base.BenchmarkError("expected 'question<TAB>answer'")
            if not images:
              raise OSError(f"image file not found: {os.path.join(image_dir, stem)}.*")
            return self._sample(os.path.basename(images[0]), index, question, answer,
                                category, images[0])
          yield txt, f"{stem} line {index + 1}", build

  def parquet_sample(self, row):
    # Each image has two questions (one 'yes', one 'no'): number them in file order.
    image_name = os.path.basename(str(row["question_id"]))  # 'count/0001.png' → '0001.png'
    key = (row["category"], image_name)
    self._seen = getattr(self, "_seen", {})
    self._seen[key] = index = self._seen.get(key, -1) + 1
    return self._sample(image_name, index, row["question"], row["answer"], row["category"],
                        base.image_value(row["image"]))

  def score(self, records):
    scores = scoring.mme_scores(
        {"category": r["target"]["category"], "image": r["target"]["image"],
         "prediction": r["prediction"], "answer": r["target"]["answers"][0]} for r in records)
    return {"score": scores["perception"], **scores, "num_questions": len(records)}
