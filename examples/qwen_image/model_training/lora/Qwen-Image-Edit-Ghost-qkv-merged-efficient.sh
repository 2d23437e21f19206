#!/usr/bin/env bash
# LoRA for Qwen-Image-Edit on the merged-QKV DiT (to_qkv / add_qkv_proj): the QUICKSTART.md command.
#
# Run from the repository root:
#   bash examples/qwen_image/model_training/lora/Qwen-Image-Edit-Ghost-qkv-merged-efficient.sh [extra flags]
# Extra flags are appended, so they add to or override the ones below (argparse keeps the last value), e.g.
#   ... --dry_run                      print the resolved settings and exit
#   ... --batch_size 4 --max_steps 500
# --compile: each DiT block through torch.compile; the first step compiles (about a minute), the later ones are faster.
# Launcher: `accelerate launch` (your `accelerate config` default), found on PATH or in ./.venv; ACCELERATE_CONFIG=<yaml>
# picks a file,
# e.g. ACCELERATE_CONFIG=examples/qwen_image/model_training/accelerate_config_ddp.yaml for 8 GPUs.
set -euo pipefail

SCRIPT=examples/qwen_image/model_training/train_merged_qkv.py
if [[ ! -f "$SCRIPT" ]]; then
  echo "error: $SCRIPT not found; run this recipe from the repository root: bash $0" >&2
  exit 1
fi
# accelerate from the active environment, else from the project's venv (`make demo` / `make install` create .venv;
# VENV=<dir> names another), so the recipe runs without activating anything.
# --quiet: a run that stops (a bad flag, a missing file) ends with the trainer's message, not with accelerate's
# traceback of the subprocess call below it.
if command -v accelerate >/dev/null 2>&1; then
  LAUNCH=(accelerate launch --quiet)
elif [[ -x "${VENV:-.venv}/bin/accelerate" ]]; then
  LAUNCH=("${VENV:-.venv}/bin/accelerate" launch --quiet)
else
  echo "error: accelerate not found. Activate the project's venv (source .venv/bin/activate, created by make demo" \
       "or make install), set VENV=<venv dir>, or pip install -e . into your environment" >&2
  exit 1
fi
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
  if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file" >&2
    exit 2
  fi
  # accelerate imports deepspeed before the trainer starts: without it, a traceback instead of this line
  PY="$(dirname "$(command -v "${LAUNCH[0]}")")/python"
  if grep -qE '^distributed_type: *DEEPSPEED' "$ACCELERATE_CONFIG" && [[ -x "$PY" ]] \
     && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)"; then
    echo "error: $ACCELERATE_CONFIG uses DeepSpeed, which is not installed: pip install deepspeed, or use" \
         "accelerate_config_ddp.yaml or accelerate_config_fsdp.yaml" >&2
    exit 2
  fi
  LAUNCH+=(--config_file "$ACCELERATE_CONFIG")
fi
# Several machines: run the same command on each, with MACHINE_RANK 0 (the main machine) to NUM_MACHINES-1 and
# NUM_PROCESSES the total over all machines; --output_path and the conditioning cache must be on a filesystem
# every machine sees. E.g. two machines of 8 GPUs, FSDP2:
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 NUM_PROCESSES=16 \
#   ACCELERATE_CONFIG=examples/qwen_image/model_training/accelerate_config_fsdp.yaml bash <this recipe>
if [[ -n "${NUM_MACHINES:-}" ]]; then
  LAUNCH+=(--num_machines "$NUM_MACHINES" --machine_rank "${MACHINE_RANK:?set MACHINE_RANK (0 on the main machine)}"
           --main_process_ip "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (the address of the main machine)}"
           --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi
if [[ -n "${NUM_PROCESSES:-}" ]]; then
  LAUNCH+=(--num_processes "$NUM_PROCESSES")
fi

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
  --output_path "./models/my_merged_qkv_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --compile \
  --dataset_num_workers 8 \
  "$@"
