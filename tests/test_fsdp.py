"""FSDP2 for real on the CPU (gloo): two processes launched as two machines through the merged recipe's multi-node
path (accelerate launch --num_machines 2) with accelerate_config_fsdp.yaml. Each process holds half of the DiT,
the losses and the LoRA equal one process training the same global batch, and a run resumed from its training
state (safetensors + json, gathered under FSDP) ends with the uninterrupted run's LoRA. The refusals of
configurations that cannot run here are checked in-process."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.trainers import main
from test_trainer import flags, losses
from test_trainer_scale import assert_same_training

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = "examples/qwen_image/model_training/accelerate_config_fsdp.yaml"
RECIPE = "examples/qwen_image/model_training/lora/Qwen-Image-Edit-Ghost-qkv-merged-efficient.sh"
COMMON = ["--dataset_repeat", "4", "--cache_conditioning", "--max_steps", "3", "--save_steps", "1",
          "--dataset_num_workers", "0"]


def env(**extra):
    venv_bin = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_fsdp2_shards_the_dit_and_trains_as_one_process(tiny_models, data, tmp_path):
    out = str(tmp_path / "fsdp")
    args = flags(tiny_models, data, out, *COMMON)
    # two "machines" of one process each on this host: the recipe's multi-node launch, FSDP2
    machines = [subprocess.Popen(["bash", RECIPE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env(ACCELERATE_CONFIG=FSDP_CONFIG, NUM_MACHINES="2", NUM_PROCESSES="2",
                                                    MACHINE_RANK=str(rank), MAIN_PROCESS_IP="127.0.0.1",
                                                    MAIN_PROCESS_PORT="29547"))
                for rank in (0, 1)]
    outputs = [m.communicate(timeout=400) for m in machines]
    for m, (stdout, stderr) in zip(machines, outputs):
        assert m.returncode == 0, stderr[-3000:]
    # each process holds half of the DiT's parameters (FSDP2 shards every parameter over the two)
    for rank, (stdout, _) in enumerate(outputs):
        m = re.search(rf"process {rank} of 2 \(FSDP2\) holds ([0-9.]+) MiB of the DiT's ([0-9.]+) MiB", stdout)
        assert m, stdout[-2000:]
        held, total = float(m.group(1)), float(m.group(2))
        assert held == pytest.approx(total / 2, rel=0.05), (held, total)

    # one process, batch 2: the same global batch and noise per sample -> the same losses and LoRA
    one = str(tmp_path / "one")
    assert main(flags(tiny_models, data, one, *COMMON, "--batch_size", "2", "--use_gradient_checkpointing")) == 0
    assert_same_training(one, out)

    # resumed under FSDP2 from the state written after step 1 (the optimizer state gathered, unsharded), with
    # --selective_checkpointing (FSDP's hooks run inside the checkpoint): the uninterrupted run's LoRA, bit for bit
    resumed = str(tmp_path / "resumed")
    # and validates two samples of a --validation_prompts file, every process running the pipeline (FSDP gathers
    # the weights in each forward), the main one writing
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "make the red square blue", "edit_image": "%s"}\n{"prompt": "a green square", '
                       '"width": 32, "height": 32, "steps": 1}\n' % os.path.join(data, "edits", "edit000.png"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
           "--main_process_port", "29557", "examples/qwen_image/model_training/train_merged_qkv.py",
           *flags(tiny_models, data, resumed, *COMMON, "--use_gradient_checkpointing", "--compile",  # as the recipe
                  "--resume_from_checkpoint", os.path.join(out, "checkpoints", "step-1"),
                  "--selective_checkpointing",  # changes no number, under FSDP2 too
                  "--validation_prompts", str(prompts), "--validation_inference_steps", "2")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    a = load_file(os.path.join(out, "checkpoint-final.safetensors"))
    b = load_file(os.path.join(resumed, "checkpoint-final.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert losses(resumed)[-2:] == losses(out)[-2:]
    for k, size in (("1", (64, 64)), ("2", (32, 32))):
        assert sorted(os.listdir(os.path.join(resumed, "validation", k))) == ["final.png", "grid.png"]
        assert Image.open(os.path.join(resumed, "validation", k, "final.png")).size == size


class _Args:
    blocks_to_swap = 0
    batch_size = 1
    gradient_accumulation_steps = 1
    max_grad_norm = 1.0


def test_configs_that_would_silently_run_as_ddp_are_refused(monkeypatch):
    """On the CPU accelerate would run a DeepSpeed config as DDP: refused with the fix; FSDP2 with block swap too
    (both decide where the weights live). FSDP1 is refused before accelerate starts (test_robustness.py)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from diffsynth.trainers.distributed import DistributedSetupError, setup_distributed

    def fresh(**env_vars):
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        for k, v in env_vars.items():
            monkeypatch.setenv(k, v)
        acc = Accelerator(cpu=True)
        # as under `accelerate launch` with several processes on the CPU
        acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        return acc

    acc = fresh()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # (with it set, Accelerator() wants deepspeed installed)
    with pytest.raises(DistributedSetupError, match="asks for DeepSpeed, but accelerate runs DeepSpeed only on GPUs"):
        setup_distributed(acc, _Args)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    acc = fresh(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    swap = type("Swap", (_Args,), {"blocks_to_swap": 4})
    with pytest.raises(DistributedSetupError, match="--blocks_to_swap and FSDP"):
        setup_distributed(acc, swap)
    assert acc.is_fsdp2  # FSDP2 is switched on before the refusal of the swap; a plain run goes on with it
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
