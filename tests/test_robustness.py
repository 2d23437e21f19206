"""Issue 10: a run owns its output folder, bad flags and files are refused up front, NaN stops a run with its last
good checkpoint, the standard-layout copy of every checkpoint."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.lora import lora_deltas, lora_to_standard
from diffsynth.trainers import Trainer, main, parse_args
from diffsynth.trainers.trainer import NonFiniteError
from test_trainer import flags, losses


def steps_logged(out):
    with open(os.path.join(out, "train_log.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# ---- item 1: every LoRA checkpoint gets a standard-layout copy every consumer reads ----------------------------

def test_merged_run_writes_a_standard_copy_of_every_checkpoint(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--save_steps", "1", "--cache_conditioning")) == 0
    for name in ("step-1", "step-2", "checkpoint-final"):
        native, copy = (os.path.join(out, f"{name}{s}.safetensors") for s in ("", "-standard"))
        keys = load_file(copy)
        assert "transformer_blocks.0.attn.to_k.lora_A.weight" in keys and "transformer_blocks.0.attn.to_k.alpha" in keys
        assert load_file(native)["transformer_blocks.0.attn.to_qkv.alpha"].item() == 4.0  # alpha tensors in native
        expected = lora_deltas(lora_to_standard(native))
        assert {k: v for k, v in lora_deltas(copy).items()}.keys() == expected.keys()
        for k, v in lora_deltas(copy).items():
            assert torch.equal(v, expected[k]), k
    # a standard run's checkpoint already is that file; --export_format none writes no copy
    std, none = str(tmp_path / "std"), str(tmp_path / "none")
    assert main(flags(tiny_models, data, std, "--max_steps", "1", "--cache_conditioning"), merged_qkv=False) == 0
    assert main(flags(tiny_models, data, none, "--max_steps", "1", "--cache_conditioning",
                      "--export_format", "none")) == 0
    for folder in (std, none):
        assert not [f for f in os.listdir(folder) if f.endswith(("-standard.safetensors", "-native.safetensors"))]


# ---- item 5: the output folder belongs to one run ------------------------------------------------------------

def test_a_second_trainer_on_a_locked_folder_is_refused(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "now"}))
        assert main(flags(tiny_models, data, str(out), "--max_steps", "1", "--cache_conditioning")) == 2
        err = capsys.readouterr().err
        assert f"in use by another training run (pid {alive.pid} on host {socket.gethostname()}" in err
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written, the other run's lock untouched
    finally:
        alive.kill()
        alive.wait()
    # its process is gone: the lock is stale and taken over; the run ends and gives it back
    assert main(flags(tiny_models, data, str(out), "--max_steps", "1", "--cache_conditioning")) == 0
    assert not (out / ".lock").exists() and (out / "checkpoint-final.safetensors").exists()


def test_another_runs_checkpoints_need_resume_or_overwrite(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--save_steps", "2", "--cache_conditioning")) == 0
    # killed saves leave temp files; a new run must not mix with the old one's step files
    open(os.path.join(out, ".tmp-abc-step-9.safetensors"), "wb").write(b"x" * 100)
    os.makedirs(os.path.join(out, "checkpoints", "step-9.tmp"))
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--lora_rank", "2", "--cache_conditioning")) == 2
    err = capsys.readouterr().err
    assert "holds another run's files (checkpoint-final-standard.safetensors, checkpoint-final.safetensors" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite" in err
    assert os.path.exists(os.path.join(out, "step-2.safetensors"))
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--lora_rank", "2", "--cache_conditioning",
                      "--overwrite")) == 0
    left = sorted(os.listdir(out))
    assert "step-2.safetensors" not in left and "checkpoints" not in left and "cache" in left
    assert not [f for f in left if ".tmp" in f]
    assert load_file(os.path.join(out, "checkpoint-final.safetensors"))[
        "transformer_blocks.0.attn.to_qkv.lora_A.weight"].shape[0] == 2


def test_resume_logs_each_step_once_and_refuses_another_rank_before_loading(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--save_steps", "2", "--cache_conditioning", "--dataset_repeat", "3"]
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "3")) == 0  # state at 2, log up to 3
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "4", "--resume_from_checkpoint", "latest")) == 0
    assert steps_logged(out) == [1, 2, 3, 4]
    # another --lora_rank: one message naming both, before any model loads
    code = main(flags(tiny_models, data, out, *common, "--max_steps", "6", "--resume_from_checkpoint", "latest",
                      "--lora_rank", "8", "--models_dir", str(tmp_path / "no-models")))
    err = capsys.readouterr().err
    assert code == 2 and "--lora_rank: state 4, this run 8" in err and "Traceback" not in err


# ---- item 7: flags that cannot train; NaN stops with the last good checkpoint ----------------------------------

@pytest.mark.parametrize("bad, message", [
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    (["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--resume_from_checkpoint", "latest", "--overwrite"], "pass one of them"),
    (["--validation_prompt", "a\udcffb"], "--validation_prompt is not valid UTF-8"),
])
def test_flags_that_cannot_train_are_refused(tiny_models, data, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), *bad))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_dry_run_checks_the_dataset_and_output(tiny_models, data, tmp_path, capsys):
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--dry_run")
    assert main(argv) == 0
    assert main(argv + ["--dataset_metadata_path", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: metadata file not found" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(argv + ["--output_path", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_non_finite_lora_files_are_refused_by_name_before_loading(tiny_models, data, tmp_path, capsys):
    bad = str(tmp_path / "nan_lora.safetensors")
    save_file({"transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.full((4, 64), float("nan")),
               "transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(64, 4)}, bad)
    for flag in ("--lora_checkpoint", "--lora_fused"):
        code = main(flags(tiny_models, data, str(tmp_path / flag[2:]), flag, bad, "--models_dir",
                          str(tmp_path / "no-models")))
        err = capsys.readouterr().err
        assert code == 2 and f"{flag}: {bad}: 1 tensor(s) hold NaN or inf values" in err, err


def test_a_non_finite_gradient_stops_before_the_update(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    trainer = Trainer(parse_args(flags(tiny_models, data, out, "--max_steps", "5", "--save_steps", "2",
                                       "--dataset_repeat", "3", "--cache_conditioning")))
    trainer.setup()
    param = trainer.params[0]
    calls = []
    param.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 3 else g)[1])
    with pytest.raises(NonFiniteError, match="the gradient norm is inf at step 3 .*last good checkpoint"):
        trainer.train()
    trainer.release()
    assert all(torch.isfinite(p).all() for p in trainer.params)  # the update was not applied
    assert not os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(out, "step-2.safetensors")).values())
    assert steps_logged(out) == [1, 2]


def test_a_non_finite_update_stops_without_saving_it(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    trainer = Trainer(parse_args(flags(tiny_models, data, out, "--max_steps", "5", "--save_steps", "2",
                                       "--dataset_repeat", "3", "--cache_conditioning")))
    trainer.setup()
    step, count = trainer.optimizer.step, []

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        count.append(1)
        if len(count) == 3:
            trainer.params[1].data[0, 0] = float("nan")

    trainer.optimizer.step = poisoned_step
    with pytest.raises(NonFiniteError, match="the update of step 3 .* made 1 trainable weight tensor"):
        trainer.train()
    trainer.release()
    assert os.path.exists(os.path.join(out, "step-2.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))
    assert len(losses(out)) == 2
