"""config_files.load_config_module: a run config loaded by its path, from any directory."""

import os

import pytest

from leo_mini_jax import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loads_a_config_that_imports_its_siblings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the checkout: `configs.common` is found from the path
  module = config_files.load_config_module(os.path.join(ROOT, "configs", "tiny.py"))
  config = module.get_config("stage=3")
  assert config.data.max_length == 64 and config.stage == 3


def test_a_missing_file_is_named():
  with pytest.raises(FileNotFoundError, match="--config: no such file /nowhere/x.py"):
    config_files.load_config_module("/nowhere/x.py")
