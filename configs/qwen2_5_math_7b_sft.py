"""The CFT paper's SFT baseline: same model and recipe, imitation of WebInstruct responses.

  python scripts/prepare_data.py --input=WebInstruct-SFT-50K.json --format=auto \
      --name=webinstruct_sft_50k --data_dir=data_cache
  python scripts/train.py --config=configs/qwen2_5_math_7b_sft.py
"""

from configs import qwen2_5_math_7b_cft


def get_config():
  config = qwen2_5_math_7b_cft.get_config()
  config.name = "qwen2_5_math_7b_sft"
  config.data.mixture = "webinstruct_sft_50k:1.0"
  return config
