"""Sequence packing, measured: padding, rows per epoch, train-step throughput, FLOPs.

  python -m benchmarks.packing                          # the synthetic distribution below
  python -m benchmarks.packing --config configs/leo_mini_vicuna_7b.py:stage=3 \\
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \\
      --config.data.tokenizer=VICUNA_DIR               # a LLaVA-format JSON's real lengths

The synthetic length distribution (`synthetic_costs`), with no JSON: an example's cost
(its text tokens, plus N^V − 1 for an image when max_length counts visual tokens) is
log-normal with σ = 0.6 and mean max_length / 4, rounded and clipped to
[8, max_length]; 90% of the examples have an image (LLaVA-1.5's 665K mix: ~94%).
"""

import numpy as np

from leo_mini_jax.data import packing

SIGMA = 0.6
IMAGE_FRACTION = 0.9
MIN_COST = 8


def synthetic_costs(num: int, max_length: int, seed: int = 0,
                    image_fraction: float = IMAGE_FRACTION) -> packing.Costs:
  """`num` costs of the documented distribution (module docstring)."""
  rng = np.random.default_rng(seed)
  # A log-normal's mean is exp(μ + σ²/2): μ puts it at max_length / 4.
  mu = np.log(max_length / 4) - SIGMA ** 2 / 2
  tokens = np.clip(np.rint(rng.lognormal(mu, SIGMA, num)), MIN_COST, max_length)
  return packing.Costs(tokens.astype(np.int64), rng.random(num) < image_fraction)
