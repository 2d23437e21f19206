"""Issue 6: batches with aspect buckets, the conditioning cache, exact resume, the NaN guard, DDP."""
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL_IDS
from diffsynth.trainers import main
from diffsynth.utils.demo_data import write_edit_dataset
from test_trainer import flags, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_of_four_with_mixed_aspect_ratios(tiny_models, tmp_path, capsys):
    data = str(tmp_path / "data")
    write_edit_dataset(data, num_samples=12, sizes=[(64, 64), (64, 32), (32, 64)])
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--batch_size", "4", "--num_epochs", "2", "--cache_conditioning")) == 0
    printed = capsys.readouterr().out
    assert "12 samples in 3 size bucket(s), batch size 4: 3 batches per epoch" in printed
    assert len(losses(out)) == 6
    assert all(torch.isfinite(torch.tensor(losses(out))))


def test_cached_and_uncached_losses_are_equal(tiny_models, data, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache_conditioning", str(tmp_path / "cache")])):
        out = str(tmp_path / name)
        assert main(flags(tiny_models, data, out, "--max_steps", "4", "--dataset_repeat", "2", *extra)) == 0
        runs[name] = losses(out)
    assert len(os.listdir(tmp_path / "cache")) == 2  # one file per sample, keyed by content
    assert runs["plain"] == runs["cached"]
    # a second cached run reads the cache without loading the text encoder or VAE
    from diffsynth.pipelines import qwen_image

    seen = []
    real = qwen_image.QwenImagePipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("need"))
        return real(cls, *args, **kwargs)

    qwen_image.QwenImagePipeline.from_pretrained = classmethod(spy)
    try:
        out = str(tmp_path / "again")
        assert main(flags(tiny_models, data, out, "--max_steps", "4", "--dataset_repeat", "2",
                          "--cache_conditioning", str(tmp_path / "cache"))) == 0
    finally:
        qwen_image.QwenImagePipeline.from_pretrained = classmethod(real)
    assert seen == [("dit",)]
    assert losses(out) == runs["plain"]
    # what else decides the cached tensors is part of their names: another prompt template recomputes them
    out = str(tmp_path / "plus")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--cache_conditioning", str(tmp_path / "cache"),
                      "--edit_plus")) == 0
    assert len(os.listdir(tmp_path / "cache")) == 4


def test_resume_equals_uninterrupted(tiny_models, data, tmp_path):
    common = ["--num_epochs", "2", "--dataset_repeat", "2", "--save_steps", "3", "--cache_conditioning",
              str(tmp_path / "cache"), "--checkpoints_total_limit", "1"]
    full = str(tmp_path / "full")
    assert main(flags(tiny_models, data, full, *common)) == 0
    part = str(tmp_path / "part")
    assert main(flags(tiny_models, data, part, *common, "--max_steps", "3")) == 0
    state = os.path.join(part, "checkpoints", "step-3")
    assert sorted(os.listdir(state)) == ["lr_scheduler.json", "lr_scheduler.safetensors", "model.safetensors",
                                         "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
                                         "state.json", "train_state.json", "train_state.safetensors"]
    # a pickle planted where accelerate's save_state kept custom state is never opened
    import pickle

    from test_checkpoint import Planted

    with open(os.path.join(state, "custom_checkpoint_0.pkl"), "wb") as f:
        pickle.dump(Planted(str(tmp_path / "pwned")), f)
    assert main(flags(tiny_models, data, part, *common, "--resume_from_checkpoint", "latest")) == 0
    assert not (tmp_path / "pwned").exists()
    a = load_file(os.path.join(full, "checkpoint-final.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert losses(part)[-5:] == losses(full)[-5:]
    # checkpoints_total_limit 1: only the newest training state is kept
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["step-6"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_models, data, tmp_path, monkeypatch, capsys):
    import diffsynth.trainers.trainer as trainer_module

    real, calls = trainer_module.flow_matching_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_module, "flow_matching_loss", poisoned)
    out = str(tmp_path / "out")
    code = main(flags(tiny_models, data, out, "--max_steps", "6", "--save_steps", "1", "--dataset_repeat", "3",
                      "--cache_conditioning"))
    assert code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err
    # the weights saved after step 2 gave the NaN: set aside; the one before is named as the last good checkpoint
    assert "step-2.safetensors, step-2-standard.safetensors, checkpoints/step-2 renamed to *.nonfinite" in err
    assert f"The last good checkpoint is {os.path.join(out, 'step-1.safetensors')}." in err
    assert not os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))
    assert not os.path.exists(os.path.join(out, "step-2.safetensors"))
    from diffsynth.trainers.checkpoint import list_states

    assert list_states(os.path.join(out, "checkpoints")) == [os.path.join(out, "checkpoints", "step-1")]
    good = load_file(os.path.join(out, "step-1.safetensors"))
    assert good and all(torch.isfinite(v).all() for v in good.values())
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, need=("dit",))
    pipe.load_lora(os.path.join(out, "step-1.safetensors"))


def assert_same_training(reference, run):
    """Losses and final LoRA equal up to float summation order (a batch of 2 vs two averaged gradients)."""
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    a = load_file(os.path.join(reference, "checkpoint-final.safetensors"))
    b = load_file(os.path.join(run, "checkpoint-final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


def launch_two_processes(tiny_models, data, out, port, *extra, config=None):
    # `--cpu` makes accelerate 1.x start ONE process; `--multi_gpu` starts two through torchrun, which then
    # train with gloo on the CPU when no GPU is present. `config`: an accelerate config file instead (e.g. FSDP).
    launch = ["--config_file", config] if config else ["--multi_gpu", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port),
           os.path.join(ROOT, "examples/qwen_image/model_training/train_merged_qkv.py"),
           *flags(tiny_models, data, out, "--dataset_repeat", "4", "--cache_conditioning", *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_and_exact_resume(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    result = launch_two_processes(tiny_models, data, out, 29517, "--max_steps", "3", "--save_steps", "1",
                                  "--export_format", "comfyui")
    assert "8 samples in 1 size bucket(s), batch size 1: 8 batches per epoch, 4 per process (2 process(es))" \
        in result.stdout
    names = sorted(os.listdir(out))
    for name in ("checkpoint-final.safetensors", "checkpoint-final-comfyui.safetensors", "step-1.safetensors",
                 "step-3.safetensors", "loss.png"):
        assert name in names
    assert not [n for n in names if ".tmp" in n]
    assert len(losses(out)) == 3  # one writer: the main process logs each step once
    # DDP: every process holds the whole DiT
    for rank in (0, 1):
        assert re.search(rf"process {rank} of 2 \(DDP\) holds ([0-9.]+) MiB of the DiT's \1 MiB", result.stdout)
    # and two processes at batch 1 train as one process at batch 2 (the same global batch, the same noise)
    one = str(tmp_path / "one")
    assert main(flags(tiny_models, data, one, "--dataset_repeat", "4", "--cache_conditioning", "--max_steps", "3",
                      "--batch_size", "2")) == 0
    assert_same_training(one, out)

    # stopped after step 1 and resumed, under FSDP2 (a DDP state holds its optimizer state by parameter index, FSDP's
    # loader reads it by name): the same LoRA as the uninterrupted run, on both processes' data and noise
    part = str(tmp_path / "part")
    launch_two_processes(tiny_models, data, part, 29527, "--max_steps", "1", "--save_steps", "1")
    launch_two_processes(tiny_models, data, part, 29537, "--max_steps", "3", "--save_steps", "1",
                         "--resume_from_checkpoint", "latest",
                         config=os.path.join(ROOT, "examples/qwen_image/model_training/accelerate_config_fsdp.yaml"))
    a = load_file(os.path.join(out, "checkpoint-final.safetensors"))
    b = load_file(os.path.join(part, "checkpoint-final.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_fp8_weights_under_ddp(tiny_models, data, tmp_path):
    """gloo cannot send fp8 tensors: DDP leaves the frozen weights out of its start-up broadcast (they are loaded
    alike everywhere), so fp8 storage trains with two processes as with one at the same global batch."""
    out, one = str(tmp_path / "ddp"), str(tmp_path / "one")
    launch_two_processes(tiny_models, data, out, 29567, "--max_steps", "2", "--enable_fp8_training")
    assert main(flags(tiny_models, data, one, "--dataset_repeat", "4", "--cache_conditioning", "--max_steps", "2",
                      "--batch_size", "2", "--enable_fp8_training")) == 0
    assert_same_training(one, out)


def test_validation_images_and_grid(tiny_models, data, tmp_path):
    from PIL import Image

    edit = os.path.join(data, "edits", "edit000.png")
    common = ["--num_epochs", "3", "--max_steps", "5", "--validation_prompt", "make the red square blue",
              "--validation_edit_image", edit, "--validation_steps", "2", "--validation_inference_steps", "2"]
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, *common)) == 0
    folder = os.path.join(out, "validation")
    assert sorted(os.listdir(folder)) == ["final.png", "grid.png", "step-2.png", "step-4.png"]
    shot = Image.open(os.path.join(folder, "step-2.png"))
    assert shot.size == (64, 64)  # the edit image's size, unlabelled; the label is in the PNG's text chunks
    assert shot.text == {"step": "step 2", "prompt": "make the red square blue"}
    # the grid: a header band, then the input and the three outputs, each with a label band under it
    grid = Image.open(os.path.join(folder, "grid.png"))
    assert grid.width == 4 * 64 and grid.height > 64 + 2 * 10
    # training changed the LoRA between two validations, so the pictures differ
    a, b = (Image.open(os.path.join(folder, f)).tobytes() for f in ("step-2.png", "final.png"))
    assert a != b
    # with the conditioning cache: the prompt and edit image are encoded once at the start and the text encoder
    # is freed; the same pictures come out
    cached = str(tmp_path / "cached")
    assert main(flags(tiny_models, data, cached, *common, "--cache_conditioning")) == 0
    for name in ("step-2.png", "step-4.png", "final.png"):
        assert Image.open(os.path.join(cached, "validation", name)).tobytes() == \
            Image.open(os.path.join(folder, name)).tobytes(), name


def test_report_to_tensorboard(tiny_models, data, tmp_path, capsys):
    import importlib.util

    out = str(tmp_path / "out")
    args = flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--report_to", "tensorboard")
    if importlib.util.find_spec("tensorboard") is None:
        # refused before anything loads, with the install command
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        assert "--report_to tensorboard needs the `tensorboard` package" in capsys.readouterr().err
        assert not os.path.exists(out)
        return
    assert main(args) == 0
    logged = [f for _, _, files in os.walk(os.path.join(out, "tensorboard")) for f in files]
    assert any(f.startswith("events.") for f in logged)
    assert len(losses(out)) == 2  # the CSV log is always written
