"""Scorers against cases worked by hand from the official definitions."""

import pytest

from leo_mini_jax.evaluation import scoring


@pytest.mark.parametrize("raw,normalised", [
    ("Two", "2"), ("The Dog.", "dog"), ("dont know", "don't know"),
    ("don't know", "don't know"), ("black-white", "black white"),
    ("black - white", "black white"), ("1,000", "1000"), ("3.5", "3.5"),
    ("It's red!", "it 's red"), ("  yes\n", "yes"), ("none", "0"), ("", "")])
def test_vqa_answer_processor(raw, normalised):
  assert scoring.normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_leave_one_out():
  # 3 annotators say "2", 7 say "3": leaving out one of the "2"s leaves 2 matches (2/3),
  # leaving out any other leaves 3 (1.0): (3·2/3 + 7·1) / 10.
  answers = ["2"] * 3 + ["3"] * 7
  assert scoring.vqa_accuracy("two", answers) == pytest.approx(0.9)
  assert scoring.vqa_accuracy("3", answers) == pytest.approx(1.0)
  # One annotator: every leave-one-out subset holds 0 or 1 match of 1/3.
  one = ["cat"] + ["dog"] * 9
  assert scoring.vqa_accuracy("cat", one) == pytest.approx(9 / 10 * (1 / 3))
  assert scoring.vqa_accuracy("don't know", ["dont know"] * 10) == 1.0
  assert scoring.vqa_accuracy("Unanswerable.", ["unanswerable"] * 10) == 1.0
  assert scoring.vqa_accuracy("", ["yes"] * 10) == 0.0
  with pytest.raises(ValueError):
    scoring.vqa_accuracy("yes", [])


def test_anls():
  assert scoring.anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
  assert scoring.anls("ABC ", ["abc"]) == 1.0
  assert scoring.anls("abc", ["xyz"]) == 0.0
  # "ab" vs "cd ab": 3 edits / 5 = NL 0.6 → 0.
  assert scoring.anls("ab", ["cd ab"]) == 0.0
  # NL exactly 0.5 ("abcd" vs "abxy": 2 edits / 4) keeps 0.5, as lmms-eval's anls does.
  assert scoring.anls("abcd", ["abxy"]) == 0.5
  # lmms-eval divides by the lengths as given, before squeezing whitespace.
  assert scoring.anls("a  b", ["a b"]) == 1.0
  assert scoring.anls("ab", ["ab   "]) == pytest.approx(1.0)
  assert scoring.anls("", [""]) == 1.0
  assert scoring.anls("", ["abc"]) == 0.0
  assert scoring.anls("1987", ["1986", "1987"]) == 1.0


def test_pope_metrics():
  preds = ["Yes, there is a dog.", "No.", "There is not a cat", "yes"]
  labels = ["yes", "no", "no", "no"]
  m = scoring.pope_metrics(preds, labels)
  assert m == pytest.approx({"accuracy": 0.75, "precision": 0.5, "recall": 1.0,
                             "f1": 2 / 3, "yes_ratio": 0.5})
  # Only the first sentence counts, and 'Nope' is not 'no'.
  assert scoring.pope_answer("Yes. No") == "yes"
  assert scoring.pope_answer("Nope") == "yes"
  degenerate = scoring.pope_metrics(["no", "No, it is not"], ["no", "no"])
  assert degenerate == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                        "yes_ratio": 0.0}


def test_mme_scores():
  records = [
      dict(category="existence", image="1", prediction="Yes", answer="Yes"),
      dict(category="existence", image="1", prediction="No, there is none", answer="No"),
      dict(category="existence", image="2", prediction="yes", answer="Yes"),
      dict(category="existence", image="2", prediction="I think so", answer="No"),
      dict(category="code_reasoning", image="3", prediction="yes", answer="Yes"),
      dict(category="code_reasoning", image="3", prediction="Not really", answer="No"),
  ]
  out = scoring.mme_scores(records)
  assert out["subtasks"]["existence"] == pytest.approx(
      {"acc": 75.0, "acc_plus": 50.0, "score": 125.0})
  assert out["perception"] == pytest.approx(125.0)
  assert out["cognition"] == pytest.approx(200.0)
  assert scoring.mme_answer("I think yes") == "other"


def test_circular_evaluation():
  assert scoring.circular_accuracy({0: [True] * 4, 1: [True, False, True, True]}) == 0.5
  options, answer = scoring.rotate_options(["a", "b", "c", "d"], 0, 1)
  assert options == ["b", "c", "d", "a"] and answer == 3


def test_mmmu_rules():
  letters, options = "ABCD", ["red", "green", "blue", "black"]
  parse = lambda r: scoring.mmmu_multiple_choice(r, letters, options, "q1")
  assert parse("(B) because") == "B"
  assert parse("The answer is C.") == "C"
  assert parse("It is either A or B, and I pick B") == "B"
  assert parse("The colour of the sky here is clearly blue") == "C"
  assert parse("The DNA strand") == "A"  # lmms-eval's "A " test matches inside a word
  unparsed = parse("hmm")
  assert unparsed in letters and unparsed == parse("hmm")  # seeded: reruns agree
  assert scoring.mmmu_open_correct("The answer is 3.14159", ["3.14"])
  assert scoring.mmmu_open_correct("The capital is Paris.", "Paris")
  assert not scoring.mmmu_open_correct("The capital is Rome.", "Paris")
  assert scoring.mmmu_open_correct("x = 1,200", ["1200"])


def test_chartqa_ocrbench():
  assert scoring.relaxed_correct("12%", "0.12")
  assert scoring.relaxed_correct("10.4", "10")
  assert not scoring.relaxed_correct("10.6", "10")
  assert scoring.relaxed_correct("0", "0")
  assert not scoring.relaxed_correct("0.0", "0")  # a zero target compares as text
  assert scoring.relaxed_correct("Yes", "yes")
  regular = "Regular Text Recognition"
  math = "Handwritten Mathematical Expression Recognition"
  assert scoring.ocrbench_correct("The text says HELLO world", ["hello"], regular)
  assert scoring.ocrbench_correct("x ^ 2", "x^2", math)
  # lmms-eval lower-cases every prediction, also for handwritten maths (answer as given)
  assert scoring.ocrbench_correct("X^2", "x^2", math)
  assert not scoring.ocrbench_correct("X^2", "X^2", math)
  totals = scoring.ocrbench_totals({regular: 3, "Digit String Recognition": 2,
                                    "Doc-oriented VQA": 4})
  assert totals["Text Recognition"] == 5 and totals["Final Score"] == 9
  with pytest.raises(ValueError, match="unknown question type"):
    scoring.ocrbench_totals({"Nonsense": 1})


def test_mme_answer_drops_periods():
  # lmms-eval's parse_pred_ans removes every "." before reading the answer
  assert scoring.mme_answer("N.o") == "no"
  assert scoring.mme_answer("Yes.") == "yes"


def test_harness_rules():
  from leo_mini_jax.evaluation import harness_rules as rules  # pylint: disable=import-outside-toplevel
  assert rules.exact_match("Yes.", "yes") and rules.exact_match("B", "b")
  assert not rules.exact_match("the left", "left")
  assert rules.sqa_correct("B", "B") and rules.sqa_correct("B. dog", "B")
  assert not rules.sqa_correct("The answer is B", "B") and not rules.sqa_correct("b", "B")
  assert rules.seed_letter(" C. bird") == "C" and rules.seed_letter("") == ""
  options = {"A": "red", "B": "green", "C": "blue"}
  assert rules.mmbench_infer("B", options) == "B"
  assert rules.mmbench_infer("The answer is (C).", options) == "C"
  assert rules.mmbench_infer("It is green", options) == "B"
  assert rules.mmbench_infer("A or B", options) is None
  # a lone 'A' in a longer answer may be the article: the letter forms decide
  assert rules.mmbench_infer("A dog is shown B.", options) == "B"
  assert rules.mmbench_infer("green or blue", options) is None
  metrics = rules.pope_metrics(["Yes", "no", "Yes, there is", "yes"],
                               ["yes", "no", "yes", "no"])
  # "Yes, there is" is neither yes nor no: tp 1, fp 1, fn 0
  assert metrics["precision"] == 0.5 and metrics["recall"] == 1.0
  assert metrics["accuracy"] == 0.5 and metrics["yes_ratio"] == 0.5
