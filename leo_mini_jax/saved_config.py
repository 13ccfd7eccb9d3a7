"""The config a run saved in its workdir, as a config file for --config.

  python eval.py --config leo_mini_jax/saved_config.py:RUN --workdir RUN

is what eval.py, ask and train.py use when --config is left out (`run_record.
default_to_saved_config`), so --config.x=y overrides apply to the run's own config.
"""

from leo_mini_jax import run_record


def get_config(workdir: str):
  return run_record.load_config(workdir)
