"""Every command line reports a known error in a line or two naming the field or file,
exits non-zero and shows no traceback unless --verbose; demo.py deletes only its own runs."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/tiny.py:stage=1,steps=2"


def _cli(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _error_lines(result, prog):
  return [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: ")]


@pytest.mark.parametrize("override,expected", [
    ("--config.optimizer.lrr=1",
     "--config.optimizer.lrr: no such config field (did you mean 'optimizer.lr'?)"),
    ("--config.optimzer.lr=1",
     "--config.optimzer.lr: no such config field (did you mean 'optimizer'?)"),
    ("--config.model.llm.hiden_size=8",
     "--config.model.llm.hiden_size: no such config field (did you mean "
     "'model.llm.hidden_size'?)"),
])
def test_config_typo_says_did_you_mean_in_one_line(tmp_path, override, expected):
  result = _cli("train.py", TINY, f"--workdir={tmp_path / 'run'}", override)
  assert result.returncode != 0
  assert _error_lines(result, "train.py") == [f"train.py: {expected}"], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_bad_value_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  args = ("train.py", TINY, f"--workdir={tmp_path / 'run'}", "--config.stage=5")
  quiet = _cli(*args)
  assert quiet.returncode == 1
  assert _error_lines(quiet, "train.py") == [
      "train.py: config.stage: must be 1, 2 or 3, got 5"], quiet.stderr[-2000:]
  assert "Traceback" not in quiet.stderr
  verbose = _cli(*args, "--verbose")
  assert verbose.returncode == 1
  assert "Traceback" in verbose.stderr and "config.stage: must be 1, 2 or 3" in verbose.stderr


def test_eval_on_a_missing_run_names_it(tmp_path):
  missing = tmp_path / "no_run"
  result = _cli("eval.py", "--config=configs/tiny.py:stage=3", f"--workdir={missing}")
  assert result.returncode == 1
  [line] = _error_lines(result, "eval.py")
  assert str(missing) in line and "Traceback" not in result.stderr


def test_convert_with_a_missing_llm_folder_names_it(tmp_path):
  missing = tmp_path / "no_llm"
  result = _cli("-m", "leo_mini_jax.porting.convert", TINY, f"--llm={missing}",
                f"--out={tmp_path / 'out'}")
  assert result.returncode == 1
  [line] = _error_lines(result, "convert")
  assert str(missing) in line and "Traceback" not in result.stderr


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  result = _cli("demo.py", f"--workdir={tmp_path}")
  assert result.returncode == 1
  [line] = _error_lines(result, "demo.py")
  assert str(tmp_path) in line and "not a demo folder" in line
  assert (tmp_path / "notes.txt").read_text() == "mine"
  assert "Traceback" not in result.stderr


def test_demo_clears_only_its_own_runs(tmp_path):
  import demo  # pylint: disable=import-outside-toplevel
  root = tmp_path / "demo"
  demo.prepare_root(str(root), resume=False)  # new folder: marked as the demo's
  assert (root / demo.MARKER).exists()
  for name in ("stage1", "stage3"):
    (root / name).mkdir()
    (root / name / "metrics.jsonl").write_text("{}")
  (root / "my_notes").mkdir()
  (root / "my_notes" / "a.txt").write_text("keep")
  demo.prepare_root(str(root), resume=True)
  assert (root / "stage1" / "metrics.jsonl").exists()  # --resume keeps the runs
  demo.prepare_root(str(root), resume=False)
  assert sorted(os.listdir(root)) == [demo.MARKER, "my_notes"]
  assert (root / "my_notes" / "a.txt").read_text() == "keep"
  empty = tmp_path / "empty"
  empty.mkdir()
  demo.prepare_root(str(empty), resume=False)  # an empty folder is fine
  assert os.listdir(empty) == [demo.MARKER]
