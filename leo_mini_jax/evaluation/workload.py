"""A full-length synthetic batch: the workload speed and memory measurements time.

Every row is an image example at the config's `max_length`, its first half instruction
tokens and its second half a supervised answer, so no step is shortened by padding.
"""

import ml_collections
import numpy as np

from leo_mini_jax import batch as batch_lib


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A full-length batch: every row an image example with a supervised answer."""
  batch = batch_lib.dummy_batch(config, config.data.batch_size, packed=False)
  rng = np.random.default_rng(0)
  batch["input_ids"][:, 2:] = rng.integers(1, 200, batch["input_ids"][:, 2:].shape)
  batch["loss_mask"][:, config.data.max_length // 2:] = 1
  batch["instruction_mask"][:, 2:config.data.max_length // 2] = 1
  batch["image"] = rng.integers(0, 256, batch["image"].shape).astype(np.uint8)
  return batch
