"""LEO-MINI-Llama3-8B (paper §4.1): Llama-3-8B + CLIP-L/14-336 + ConvNeXt-XXL.

  python train.py --config configs/leo_mini_llama3_8b.py:stage=3,tokens=64 --workdir ... \
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \
      --config.data.tokenizer=LLAMA3_DIR --config.init_from=STAGE2_WORKDIR

The paper's Llama-3 variant also uses Pix2Struct and EVA-02; they join
`common.full_size_model` once their expert modules are registered
(models/vision/experts.py).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.full_size_config(common.llama3_8b_llm(), "llama3", arg)
