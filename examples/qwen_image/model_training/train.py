"""Train a LoRA for Qwen-Image-Edit on the standard DiT (separate to_q / to_k / to_v).

    accelerate launch examples/qwen_image/model_training/train.py --help
"""
import sys

from diffsynth.trainers import main

if __name__ == "__main__":
    sys.exit(main(merged_qkv=False))
