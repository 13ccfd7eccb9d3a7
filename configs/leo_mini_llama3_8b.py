"""LEO-MINI-Llama3-8B (paper §4.1): Llama-3-8B + CLIP-L/14-336, ConvNeXt-XXL, EVA-02-L and
Pix2Struct-large (EAGLE-X4's experts, in its order). The LLM is Meta-Llama-3-8B-Instruct, as
in EAGLE's Llama-3 scripts (the chat header and <|eot_id|> tokens are trained there).

  python train.py --config configs/leo_mini_llama3_8b.py:stage=3,tokens=64 --workdir ... \
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \
      --config.data.tokenizer=LLAMA3_INSTRUCT_DIR --config.init_from=STAGE2_WORKDIR

Start stage 3 from an EAGLE-X4 Llama-3 release instead of running stages 1–2:
  python -m leo_mini_jax.porting.convert --config configs/leo_mini_llama3_8b.py:stage=3 \
      --eagle /ckpt/Eagle-X4-8B-Plus --out /ckpt/leo_mini_llama3_from_eagle
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.full_size_config(common.llama3_8b_llm(), "llama3", arg, "llama3_8b")
  # The LM head 256 positions at a time: the 128k-vocabulary float32 logits (and their
  # gradient) at 16 rows a device are 15.7 GiB each; chunked, every stage fits 8 H100s
  # unaccumulated (stage 2 peak 54.3 GiB, 73.9 whole; docs/scale.md) for ~1.5% more
  # FLOPs. Vicuna's 32k vocabulary gains nothing from it.
  config.train.loss_chunk_length = 256
  return config
