"""MMBench (dev; en, and cn as its own benchmark) with CircularEval.

llava:   mmbench/mmbench_dev_20230712.tsv (LLaVA's scripts; for CN mmbench_cn/
         mmbench_dev_cn_20231003.tsv): index, question, hint, A..E, answer, category,
         l2-category, image as base64. An EN folder holding the CN file too reads the EN one.
parquet: lmms-lab/MMBench, its 'en' (or 'cn') dev shards (same columns, image embedded).

The released files already hold the circular copies: rows whose index is the question's
index + k·1,000,000, with the options rotated. As MMBench's evaluator (and lmms-eval) does,
every row is asked once and rows are grouped by index % 1,000,000; a question counts when
all its rows are answered right. Only a file without copies is rotated here (copy k:
options rotated left by k, index + k·1,000,000). Prompt, answer rule and length are
lmms-eval's mmbench_*_dev task: "<hint> <question> There are several options:\nA. ..."
+ the letter instruction, MMBench's `can_infer` (no GPT judge: an answer it cannot read
is wrong), 1024 new tokens (the harness default). The .xlsx the MMBench server takes
keeps every row, with a 'prediction' column.
"""

import base64
import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

OPTION_COLUMNS = ("A", "B", "C", "D", "E")
COPY_STRIDE = 1_000_000  # index of circular copy k = question index + k·COPY_STRIDE
OPTIONS_HEADER = "There are several options:"  # lmms-eval mmbench.yaml sys_prompt
# Columns the submission keeps, in the released files' order.
COLUMNS = ("index", "question", "hint", *OPTION_COLUMNS, "answer", "category",
           "l2-category", "L2-category", "source", "split")


def _missing(value) -> bool:
  return value is None or (isinstance(value, float) and value != value) or str(
      value).strip().lower() in ("", "nan", "none")


def _is_cn(name: str) -> bool:
  lowered = name.lower()
  return "_cn" in lowered or "-cn" in lowered or "_cc" in lowered


def prompt(row: dict) -> str:
  """lmms-eval's mmbench_doc_to_text."""
  options = "\n".join(f"{c}. {row[c]}" for c in OPTION_COLUMNS
                      if c in row and not _missing(row[c]))
  body = f"{row['question']} {OPTIONS_HEADER}\n{options}"
  if not _missing(row.get("hint")):
    body = f"{row['hint']} {body}"
  return body + "\n" + base.OPTION_LETTER


@base.register
class MMBench(base.Benchmark):
  name, title = "mmbench", "MMBench"
  folders = ("MMBench/en", "mmbench/en", "mmbench", "MMBench", "MMBench_EN", "mmbench_en")
  column, max_new_tokens = 1, base.HARNESS_DEFAULT_LENGTH
  default_split = "dev"
  llava_files = "mmbench_dev_20230712.tsv or mmbench_dev_en*.tsv"
  tsv_names = ("mmbench_dev_20230712.tsv", "mmbench_dev_en*.tsv", "mmbench_dev*.tsv",
               "*.tsv")
  submission_name = "mmbench_dev_en_submission.xlsx"

  def _language_excluded(self, name: str) -> bool:
    return _is_cn(name)

  def _sample(self, row, image):
    options = [str(row[c]) for c in OPTION_COLUMNS if c in row and not _missing(row[c])]
    index = int(float(row["index"]))
    target = {"index": index, "question": index % COPY_STRIDE,
              "options": dict(zip(OPTION_COLUMNS, options)),
              "category": "" if _missing(row.get("category")) else str(row["category"]),
              "row": {k: row[k] for k in COLUMNS if k in row and not _missing(row[k])}}
    if not _missing(row.get("answer")):
      target["answers"] = [OPTION_COLUMNS[base.letter_index(row["answer"], len(options))]]
    return base.Sample(id=str(index), prompt=prompt(row), image=image, target=target)

  def _with_copies(self, rows):
    """The rows as given when the file holds circular copies; else each row + its
    rotations (index + k·COPY_STRIDE)."""
    if any(int(float(r.get("index") or 0)) >= COPY_STRIDE for r in rows
           if not isinstance(r, base.BadLine)):
      return rows
    out = []
    for row in rows:
      out.append(row)
      options = [c for c in OPTION_COLUMNS if c in row and not _missing(row.get(c))]
      if isinstance(row, base.BadLine) or len(options) < 2:
        continue
      texts = [row[c] for c in options]
      answer = base.letter_index(row["answer"], len(texts)) if not _missing(
          row.get("answer")) else None
      for shift in range(1, len(texts)):
        rotated, new_answer = scoring.rotate_options(texts, answer or 0, shift)
        copy = dict(row, index=int(float(row["index"])) + shift * COPY_STRIDE,
                    **dict(zip(options, rotated)))
        if answer is not None:
          copy["answer"] = OPTION_COLUMNS[new_answer]
        out.append(copy)
    return out

  def llava_records(self):
    path = self.first_existing(self.tsv_names, exclude=self._language_excluded)
    rows = base.load_records(path)
    # MMBench's own TSVs may store a copy's image as the index of the row holding it.
    images = {str(r.get("index")): r.get("image") for r in rows}
    for row in self._with_copies(rows):
      def build(row=row):
        image = row["image"]
        if len(image) <= 64 and image in images:
          image = images[image]
        return self._sample(row, base64.b64decode(image))
      yield path, str(row.get("index")), build

  def keep_shard(self, path):
    return not any(_is_cn(part) or part in ("cn", "cc")
                   for part in os.path.relpath(path, self.root).split(os.sep))

  def _parquet_items(self, shards):
    source = {}
    rows = []
    for path, _, row in base.iter_parquet(shards):
      source[id(row)] = path
      rows.append(row)
    for row in self._with_copies(rows):
      yield source.get(id(row), shards[0]), str(row.get("index")), lambda row=row: \
          self._sample(row, base.image_value(row["image"]))

  def correct(self, record) -> bool:
    t = record["target"]
    return harness_rules.mmbench_infer(record["prediction"], t["options"]) == t["answers"][0]

  def score(self, records):
    groups, categories = {}, {}
    for r in records:
      question = r["target"]["question"]
      groups.setdefault(question, []).append(self.correct(r))
      if r["target"]["index"] < COPY_STRIDE:
        categories[question] = r["target"]["category"]
    by_category = {}
    for question, hits in groups.items():
      by_category.setdefault(categories.get(question, ""), []).append(all(hits))
    main = [r for r in records if r["target"]["index"] < COPY_STRIDE]
    return {"score": 100.0 * scoring.circular_accuracy(groups),
            "by_category": {c: 100.0 * sum(v) / len(v) for c, v in sorted(by_category.items())},
            "single_pass": base.accuracy_by(main, self.correct)["score"] if main else None,
            "num_questions": len(groups), "num_rows": len(records)}

  def write_submission(self, records, out_dir):
    """Every row with the letter read from its answer (the raw answer when none is)."""
    if not records:
      return []
    rows = []
    for r in sorted(records, key=lambda r: r["target"]["index"]):
      t = r["target"]
      letter = harness_rules.mmbench_infer(r["prediction"], t["options"])
      rows.append({**t["row"], "index": t["index"], "prediction": letter or r["prediction"]})
    path = os.path.join(out_dir, self.submission_name)
    header = [c for c in COLUMNS if any(c in row for row in rows)] + ["prediction"]
    base.write_xlsx(path, rows, header)
    return [path]


@base.register
class MMBenchCN(MMBench):
  name, title = "mmbench_cn", "MMBench-CN"
  folders = ("MMBench/cn", "mmbench_cn", "MMBench_CN", "MMBench-CN", "mmbench", "MMBench")
  column = None
  llava_files = "mmbench_dev_cn_20231003.tsv or mmbench_dev_cn*.tsv"
  tsv_names = ("mmbench_dev_cn_20231003.tsv", "mmbench_dev_cn*.tsv", "*cn*.tsv")
  submission_name = "mmbench_dev_cn_submission.xlsx"

  def _language_excluded(self, name: str) -> bool:
    return False

  def keep_shard(self, path):
    return True

  @classmethod
  def detect(cls, folder: str) -> bool:
    import glob  # pylint: disable=g-import-not-at-top
    return folder.endswith(os.sep + "cn") or bool(
        [p for p in glob.glob(os.path.join(folder, "*.tsv")) if _is_cn(os.path.basename(p))])
