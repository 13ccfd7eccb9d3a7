"""LEO-MINI-Vicuna-7B (paper §4.1): Vicuna-7B v1.5 + CLIP-L/14-336 + ConvNeXt-XXL.

  python train.py --config configs/leo_mini_vicuna_7b.py:stage=3,tokens=64 --workdir ... \
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \
      --config.data.tokenizer=VICUNA_DIR --config.init_from=STAGE2_WORKDIR

The paper's Vicuna variant also uses Pix2Struct, EVA-02 and SAM; they join
`common.full_size_model` once their expert modules are registered
(models/vision/experts.py).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.full_size_config(common.vicuna_7b_llm(), "vicuna_v1", arg)
