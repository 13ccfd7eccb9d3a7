"""A run's TensorBoard folder, shared by training and evaluation.

    <workdir>/tensorboard/events.*       training curves (`training.metrics.MetricsWriter`,
                                         rebuilt from metrics.jsonl at each start)
    <workdir>/tensorboard/eval/events.*  evaluations' scalars: a run of their own, which
                                         the training events' rebuild leaves alone
"""

from etils import epath
import jax

TENSORBOARD = "tensorboard"
EVAL_EVENTS = "eval"


def write_tensorboard(workdir: str, step: int, scalars: dict[str, float]) -> None:
  """Adds `scalars` at `step` to the run's TensorBoard (process 0), e.g. held-out
  accuracy after training, under tensorboard/eval: TensorBoard shows them as a run beside
  the training curves. Without tensorboardX, nothing is written."""
  if jax.process_index() != 0:
    return
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  writer = SummaryWriter(str(epath.Path(workdir) / TENSORBOARD / EVAL_EVENTS))
  for name, value in scalars.items():
    if value is not None:
      writer.add_scalar(name, float(value), step)
  writer.close()
