"""Loading a run config file (configs/*.py) by its path.

Config files are not part of the installed package: they are files a run names
(`--config configs/tiny.py`). They import their siblings as `configs.common`, so the folder
above the config's folder goes on sys.path, as running from a checkout's root would do.
"""

import importlib.util
import os
import sys
from types import ModuleType


def load_config_module(path: str, module_name: str = "run_config") -> ModuleType:
  """The config module at `path` (the caller calls its `get_config(arg)`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no such file {path}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
