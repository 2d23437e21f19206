"""Train a LoRA for Qwen-Image-Edit on the merged-QKV DiT (to_qkv / add_qkv_proj).

    accelerate launch examples/qwen_image/model_training/train_merged_qkv.py --help
"""
import sys

from diffsynth.trainers import main

if __name__ == "__main__":
    sys.exit(main(merged_qkv=True))
