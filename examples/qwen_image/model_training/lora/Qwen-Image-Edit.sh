#!/usr/bin/env bash
# LoRA for Qwen-Image-Edit on the standard DiT (separate to_q/to_k/to_v and add_q/k/v_proj): the same run as
# Qwen-Image-Edit-Ghost-qkv-merged-efficient.sh with train.py and the standard target names, for comparison.
# Its checkpoints load in diffusers and ComfyUI after --export_format diffusers (or the conversion script).
#
# Run from the repository root:
#   bash examples/qwen_image/model_training/lora/Qwen-Image-Edit.sh [extra flags]
# Extra flags are appended, so they add to or override the ones below (argparse keeps the last value).
# Launcher: `accelerate launch`, found on PATH or in ./.venv (VENV=<dir>); ACCELERATE_CONFIG=<yaml> picks a config file.
set -euo pipefail

SCRIPT=examples/qwen_image/model_training/train.py
if [[ ! -f "$SCRIPT" ]]; then
  echo "error: $SCRIPT not found; run this recipe from the repository root: bash $0" >&2
  exit 1
fi
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"  # LAUNCH: accelerate launch and its options

"${LAUNCH[@]}" "$SCRIPT" \
  --dataset_base_path data/ \
  --dataset_metadata_path data/metadata.csv \
  --data_file_keys "image,edit_image" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 2 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --output_path "./models/my_standard_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --compile \
  --dataset_num_workers 8 \
  "$@"
