"""Official-equivalent scoring rules of the paper's benchmarks.

Each function follows the rule its benchmark's official script (or the LLaVA / lmms-eval
script the paper's numbers come from) applies; the docstring names the rule and its
quirks. Scores are fractions in [0, 1] unless a benchmark reports points (MME, OCRBench).
"""

import math
import random
import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

# ---------------------------------------------------------------- VQA answer processor

# The EvalAI / VQA answer processor (used by VQAv2, VizWiz and TextVQA evaluation): these
# contractions written without the apostrophe get it back; the table keeps the official
# quirks (e.g. "somebody'd" → "somebodyd") so scores match the servers'.
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't
hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've
he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm
Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's
maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've
she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've
shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't
wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've
whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've
whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've"""
CONTRACTIONS = dict(pair.split() for line in _CONTRACTION_PAIRS.strip().splitlines()
                    for pair in line.split("|"))
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                   ">", "<", "@", "`", ",", "?", "!")
# As written officially: "(?!<=\d)" is a (mistyped) lookahead, so every period that is not
# followed by a digit goes ("3.5" keeps its point, "dog." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")


def normalize_vqa_answer(text: str) -> str:
  """The EvalAI answer processor: lower-case, punctuation, periods, number words → digits,
  articles dropped, apostrophe-less contractions restored."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  out = text
  # A mark next to a space (or any text with a digit-comma-digit) is deleted; a mark inside
  # a word becomes a space ("black-white" → "black white").
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for mark in VQA_PUNCTUATION:
    if delete_all or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
  words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA soft accuracy: min(1, #matching annotators / 3), averaged over the leave-one-out
  subsets of the (usually 10) human answers, after `normalize_vqa_answer` on both sides.

  An empty prediction scores 0 unless annotators answered '' too.
  """
  if not answers:
    raise ValueError("vqa_accuracy: no reference answers")
  pred = normalize_vqa_answer(prediction)
  refs = [normalize_vqa_answer(a) for a in answers]
  scores = []
  for left_out in range(len(refs)):
    matches = sum(1 for i, ref in enumerate(refs) if i != left_out and ref == pred)
    scores.append(min(1.0, matches / 3.0))
  return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insert, delete, substitute; cost 1 each)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one question (DocVQA), as lmms-eval's
  `anls` computes it (the paper's DocVQA numbers come from it).

  NL = edit distance of the lower-cased, whitespace-squeezed strings / the longer length
  of the strings as given (lmms-eval measures the un-squeezed lengths); the question
  scores 1 − min NL over the answers, or 0 when that is below `threshold`. At exactly
  NL = 0.5 the score stays 0.5, as in lmms-eval and the ST-VQA evaluator (the DocVQA
  paper's definition, NL < 0.5, would give 0). Two empty strings are identical.
  """
  if not answers:
    raise ValueError("anls: no reference answers")
  pred = " ".join(prediction.strip().lower().split())
  distances = []
  for answer in answers:
    ref = " ".join(str(answer).strip().lower().split())
    longest = max(len(str(answer)), len(prediction))
    distances.append(levenshtein(pred, ref) / longest if longest else 0.0)
  score = 1.0 - min(distances)
  return score if score >= threshold else 0.0


# ----------------------------------------------------------------------------- POPE


def pope_answer(text: str) -> str:
  """'yes' or 'no' as LLaVA's eval_pope.py reads an answer: the first sentence, commas
  dropped, split on spaces; 'no' / 'No' / 'not' among the words → 'no', else 'yes'."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1 and yes_ratio of one POPE split ('yes' = positive).

  Labels are 'yes'/'no'; a degenerate split (no predicted or no actual positives) gets 0
  for the undefined ratios instead of a division error.
  """
  if len(predictions) != len(labels):
    raise ValueError(f"pope_metrics: {len(predictions)} predictions, {len(labels)} labels")
  if not labels:
    raise ValueError("pope_metrics: empty split")
  pred = [pope_answer(p) == "yes" for p in predictions]
  gold = [str(l).strip().lower() != "no" for l in labels]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  tn = sum(not p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": sum(pred) / len(pred)}


# ------------------------------------------------------------------------------ MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def mme_answer(text: str) -> str:
  """'yes', 'no' or 'other' as MME's calculation.py (and lmms-eval's parse_pred_ans) reads
  an answer: periods dropped, the whole answer when it is yes/no, else 'yes'/'no' found in
  its first 4 characters."""
  text = text.lower().strip().replace(".", "")
  if text in ("yes", "no"):
    return text
  prefix = text[:4]
  if "yes" in prefix:
    return "yes"
  if "no" in prefix:
    return "no"
  return "other"


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """MME totals from records {'category', 'image', 'prediction', 'answer'}.

  Per subtask: acc = correct questions / questions, acc+ = images with every question
  right / images, score = 100·(acc + acc+). Perception and cognition are the sums of
  their subtasks' scores (max 2000 and 800).
  """
  by_task: dict[str, dict[str, list[bool]]] = {}
  for r in records:
    correct = mme_answer(r["prediction"]) == str(r["answer"]).lower().strip().replace(".", "")
    by_task.setdefault(r["category"], {}).setdefault(r["image"], []).append(correct)
  subtasks = {}
  for task, images in sorted(by_task.items()):
    answers = [c for image in images.values() for c in image]
    acc = sum(answers) / len(answers)
    acc_plus = sum(all(image) for image in images.values()) / len(images)
    subtasks[task] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus,
                      "score": 100 * (acc + acc_plus)}
  total = lambda names: sum(subtasks[t]["score"] for t in names if t in subtasks)
  return {"perception": total(MME_PERCEPTION), "cognition": total(MME_COGNITION),
          "subtasks": subtasks}


# -------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def circular_accuracy(groups: Mapping[Any, Sequence[bool]]) -> float:
  """MMBench CircularEval: a question counts only when every rotation of its options is
  answered right. `groups` maps the original question index to its rotations' results."""
  if not groups:
    raise ValueError("circular_accuracy: no questions")
  return sum(all(v) for v in groups.values()) / len(groups)


def rotate_options(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
  """Options rotated left by `shift` and the answer's new index (MMBench circular pass)."""
  n = len(options)
  rotated = [options[(i + shift) % n] for i in range(n)]
  return rotated, (answer - shift) % n


# ----------------------------------------------------------------------------- MMMU


def mmmu_multiple_choice(response: str, letters: Sequence[str], options: Sequence[str],
                         seed_key: str = "") -> str:
  """MMMU's parse_multi_choice_response as lmms-eval's mmmu task (EAGLE's copy) has it:
  ',.!?;:\'' stripped from the ends in turn; "(A)" forms, else "A " (a letter before a
  space, also inside a word: "DNA is" names A), else "A."; else (answers longer than 5
  words) option texts; several candidates → the one mentioned last; none → a random
  letter, as the official script does, seeded by `seed_key` so reruns agree."""
  for mark in ",.!?;:'":
    response = response.strip(mark)
  text = " " + response + " "
  index_of = {l: i for i, l in enumerate(letters)}
  candidates = [l for l in letters if f"({l})" in text]
  bracketed, by_text = bool(candidates), False
  if not candidates:
    candidates = [l for l in letters if f"{l} " in text]
  if not candidates:
    candidates = [l for l in letters if f"{l}." in text]
  if not candidates and len(text.split()) > 5:
    candidates = [l for l in letters if options[index_of[l]].lower() in text.lower()]
    by_text = bool(candidates)
  if not candidates:
    return random.Random(zlib.crc32(seed_key.encode())).choice(list(letters))
  if len(candidates) == 1:
    return candidates[0]
  if by_text:
    position = lambda l: text.lower().rfind(options[index_of[l]].lower())
  elif bracketed:
    position = lambda l: text.rfind(f"({l})")
  else:
    position = lambda l: text.rfind(f" {l} ")
  return max(candidates, key=position)


def _mmmu_number(text: str) -> float | None:
  try:
    return round(float(text.replace(",", "")), 2)
  except ValueError:
    return None


def _mmmu_normalize(text: str) -> list:
  number = _mmmu_number(text.strip())
  if number is not None:
    return [number]
  return [" " + text.strip().lower() + " "] if len(text.strip()) == 1 else [text.strip().lower()]


def mmmu_open_predictions(response: str) -> list:
  """MMMU's parse_open_response: the text after the last answer indicator of each sentence
  ("is", "so", "thus", "therefore", "final", "answer", "result", "could be", "=") plus
  the numbers in it, normalised (numbers rounded to 2 decimals, strings lower-cased)."""
  response = response.strip().strip(".").lower()
  sentences = [s for s in re.split(r"\.\s(?=[A-Z])|\n", response) if s.strip()]
  indicators = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                "result ")
  keys = []
  for index, sentence in enumerate(sentences):
    last = index == len(sentences) - 1
    shortest = None
    for indicator in indicators + (("=",) if last else ()):
      if indicator in sentence:
        piece = sentence.split(indicator)[-1].strip()
        if shortest is None or len(piece) < len(shortest):
          shortest = piece
    if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
      keys.append(shortest)
  if not keys:
    keys = [response]
  preds = []
  for key in keys:
    preds.append(key.strip(" .,:;!?"))
    preds += re.findall(r"-?\d+(?:\.\d+)?(?:,\d{3})*(?:\.\d+)?", key)
  out = []
  for pred in preds:
    out += _mmmu_normalize(pred)
  return list(dict.fromkeys(out))


def mmmu_open_correct(response: str, answers: Sequence[str] | str) -> bool:
  """MMMU's eval_open: a prediction string containing a gold string, or a prediction
  number equal to a gold number (both normalised)."""
  golds = [answers] if isinstance(answers, str) else list(answers)
  norm_golds = [g for a in golds for g in _mmmu_normalize(str(a))]
  for pred in mmmu_open_predictions(response):
    for gold in norm_golds:
      if isinstance(pred, str) and isinstance(gold, str) and gold.strip() in pred:
        return True
      if isinstance(pred, float) and isinstance(gold, float) and pred == gold:
        return True
  return False


# ------------------------------------------------------------- ChartQA and OCRBench


def _chart_float(text: str) -> float | None:
  text = text.strip()
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
  """ChartQA relaxed accuracy: numbers within `tolerance` relative error ("12%" = 0.12),
  anything else (and a zero target) by case-insensitive exact match."""
  pred, gold = _chart_float(prediction), _chart_float(target)
  if pred is not None and gold:
    return abs(pred - gold) / abs(gold) <= tolerance
  return prediction.strip().lower() == target.strip().lower()


OCRBENCH_CATEGORIES = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition",
                         "Artistic Text Recognition", "Handwriting Recognition",
                         "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": (
        "Handwritten Mathematical Expression Recognition",),
}


def ocrbench_correct(prediction: str, answers: Sequence[str] | str, category: str) -> bool:
  """OCRBench as lmms-eval scores it: some answer is a substring of the prediction —
  lower-cased, newlines as spaces; for handwritten math (HME100k) every space and newline
  removed, the answer's case kept and the prediction lower-cased (lmms-eval lower-cases
  every prediction first, so an answer with capitals never matches there)."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  prediction = prediction.lower().strip()
  for answer in answers:
    if category == "Handwritten Mathematical Expression Recognition":
      gold = str(answer).strip().replace("\n", " ").replace(" ", "")
      pred = prediction.replace("\n", " ").replace(" ", "")
    else:
      gold = str(answer).lower().strip().replace("\n", " ")
      pred = prediction.lower().strip().replace("\n", " ")
    if gold in pred:
      return True
  return False


def ocrbench_totals(per_type_correct: Mapping[str, int]) -> dict[str, int]:
  """Category totals and the final score (out of 1000) from correct counts per question
  type."""
  unknown = sorted(set(per_type_correct) - {t for ts in OCRBENCH_CATEGORIES.values()
                                            for t in ts})
  if unknown:
    raise ValueError(f"OCRBench: unknown question type(s) {unknown}")
  totals = {name: sum(per_type_correct.get(t, 0) for t in types)
            for name, types in OCRBENCH_CATEGORIES.items()}
  totals["Final Score"] = sum(totals.values())
  return totals


def mean(values: Iterable[float]) -> float:
  values = list(values)
  return sum(values) / len(values) if values else math.nan
