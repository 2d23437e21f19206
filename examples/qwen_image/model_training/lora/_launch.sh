# Sourced by the recipes in this folder (not a recipe itself): builds LAUNCH, the `accelerate launch` command line
# of a run, from the environment: VENV, ACCELERATE_CONFIG, NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP,
# MAIN_PROCESS_PORT, NUM_PROCESSES. Stops with one line where the launch could not work.
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
