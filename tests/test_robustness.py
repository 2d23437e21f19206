"""Issue 10: a run owns its output folder, bad flags and files are refused up front, NaN stops a run with its last
good checkpoint, the standard-layout copy of every checkpoint."""
import csv
import json
import os
import shutil
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


def test_lora_files_total_limit_keeps_the_newest_intermediate_files_across_a_resume(tiny_models, data, tmp_path):
    out = str(tmp_path / "out[1]*")  # glob characters in the folder's name match nothing else
    os.makedirs(out)
    users = ["notes.txt", "step-1.safetensors.bak"]  # a user's files, not the trainer's names
    for name in users:
        open(os.path.join(out, name), "w").write("mine")
    common = ["--save_steps", "1", "--lora_files_total_limit", "2", "--export_format", "diffusers",
              "--ema_decay", "0.9", "--cache_conditioning"]

    def kept(*steps):  # each save: its file, -ema, and both's export copy; checkpoint-final is never counted
        return sorted(f"{name}{ema}{copy}.safetensors" for name in [f"step-{s}" for s in steps] + ["checkpoint-final"]
                      for ema in ("", "-ema") for copy in ("", "-diffusers"))

    assert main(flags(tiny_models, data, out, *common, "--max_steps", "4")) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == kept(3, 4)
    # the resumed run counts the files written before the resume as its own, in step order
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "6", "--resume_from_checkpoint", "latest")) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == kept(5, 6)
    assert all(open(os.path.join(out, name)).read() == "mine" for name in users)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{s}" for s in range(1, 7)]  # not limited


def test_prune_weight_files_dates_epoch_files_by_their_steps(tmp_path):
    from diffsynth.trainers.trainer import prune_weight_files

    folder = tmp_path / "a[b]?"
    folder.mkdir()
    files = {"step-2": "2", "step-2-standard": "2", "step-2-ema": "2", "step-2-ema-standard": "2",
             "epoch-1": "3", "epoch-1-kohya": "3", "step-4": "4", "step-4-standard": "4",
             "step-6": "6",  # written after the step pruned at (an earlier attempt of a resumed run): left
             "step-2-mine": "2",  # not a name the trainer writes, nor are a leading zero and non-ASCII digits
             "step-02": "2", "epoch-01": "2", "step-\u0662": "2"}
    for name, steps in files.items():
        save_file({"w": torch.zeros(1)}, str(folder / f"{name}.safetensors"), {"steps": steps})
    (folder / "epoch-9.safetensors").write_bytes(b"not safetensors")  # cannot be dated: left
    deleted = prune_weight_files(str(folder), 1, 5)
    assert sorted(os.path.basename(p) for p in deleted) == sorted(
        f"{n}.safetensors" for n in ("step-2", "step-2-standard", "step-2-ema", "step-2-ema-standard", "epoch-1",
                                     "epoch-1-kohya"))
    assert sorted(os.listdir(folder)) == sorted(f"{n}.safetensors" for n in (
        "step-4", "step-4-standard", "step-6", "step-2-mine", "step-02", "epoch-01", "step-\u0662", "epoch-9"))


def test_prune_weight_files_keeps_the_epoch_file_just_written_at_a_step_file_s_step(tmp_path):
    """At an epoch's last step the loop saves step-N, then epoch-K: with --lora_files_total_limit 1 the epoch file,
    written last, is the newest (name order deleted it right after its save)."""
    from diffsynth.trainers.trainer import prune_weight_files

    for name, steps in (("step-2", "2"), ("step-4", "4"), ("epoch-2", "4")):  # epoch-2 ends at step 4
        save_file({"w": torch.zeros(1)}, str(tmp_path / f"{name}.safetensors"), {"steps": steps})
    prune_weight_files(str(tmp_path), 1, 4)
    assert sorted(os.listdir(tmp_path)) == ["epoch-2.safetensors"]


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


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_dry_run_probes_the_output_folder_as_root_too(tiny_models, data, tmp_path, capsys):
    """A folder where no file can be created fails the dry run, as it fails the run; os.access said yes to root
    there (/proc stands in for a read-only mount), so the dry run passed what the run then refused."""
    argv = flags(tiny_models, data, "/proc/diffsynth-out", "--dry_run")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--output_path /proc/diffsynth-out: cannot create files in /proc (" in err and "Traceback" not in err
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--dry_run", "--cache_conditioning",
                      "/proc/diffsynth-cache")) == 2
    assert "--cache_conditioning /proc/diffsynth-cache: cannot write in /proc (" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/.tmp-probe-*"))


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
    # the weights saved after step 2 gave it: their files are set aside, so 'latest' cannot pick them up again
    with pytest.raises(NonFiniteError, match="the gradient norm is inf at step 3 .*The weights saved after step 2 gave "
                                             "it: step-2.safetensors, step-2-standard.safetensors, checkpoints/step-2 "
                                             "renamed to \\*.nonfinite"):
        trainer.train()
    trainer.release()
    assert all(torch.isfinite(p).all() for p in trainer.params)  # the update was not applied
    assert not os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))
    assert not os.path.exists(os.path.join(out, "step-2.safetensors"))
    kept = load_file(os.path.join(out, "step-2.safetensors.nonfinite"))  # renamed, not lost
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-2.nonfinite"))
    assert steps_logged(out) == [1, 2]


def test_a_non_finite_gradient_after_pruned_saves_says_none_is_left(tiny_models, data, tmp_path):
    """With --lora_files_total_limit 1 the file before the one that gave the NaN is gone: the message says so rather
    than that earlier checkpoints are kept."""
    out = str(tmp_path / "out")
    trainer = Trainer(parse_args(flags(tiny_models, data, out, "--max_steps", "5", "--save_steps", "1",
                                       "--lora_files_total_limit", "1", "--dataset_repeat", "3",
                                       "--cache_conditioning")))
    trainer.setup()
    calls = []
    trainer.params[0].register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 3 else g)[1])
    with pytest.raises(NonFiniteError, match="renamed to \\*.nonfinite .*No earlier weight file of this run is left: "
                                             "--lora_files_total_limit 1 deleted the older ones"):
        trainer.train()
    trainer.release()
    assert not os.path.exists(os.path.join(out, "step-1.safetensors"))
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-1"))  # the states are not limited: resumable


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


# ---- audit of 2026-11-28: nothing of an earlier run is lost, resume fits or is refused before loading -------------

def test_overwrite_deletes_the_earlier_run_only_once_the_models_have_loaded(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--cache_conditioning")) == 0
    before = sorted(os.listdir(out))
    # the models cannot load: the earlier run's files are all still there
    code = main(flags(tiny_models, data, out, "--max_steps", "1", "--overwrite", "--models_dir",
                      str(tmp_path / "no-models")))
    assert code == 2 and sorted(os.listdir(out)) == before, capsys.readouterr().err
    # continuing the earlier LoRA in its own folder with --overwrite would delete that LoRA: refused
    lora = os.path.join(out, "checkpoint-final.safetensors")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--overwrite", "--lora_checkpoint", lora)) == 2
    assert f"--overwrite would delete --lora_checkpoint {lora}" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_resume_latest_without_a_state_does_not_overwrite_the_run(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--cache_conditioning")) == 0
    final = load_file(os.path.join(out, "checkpoint-final.safetensors"))
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--resume_from_checkpoint", "latest",
                      "--seed", "2")) == 2
    err = capsys.readouterr().err
    assert "holds another run's files" in err and "no training state to continue from" in err
    for k, v in load_file(os.path.join(out, "checkpoint-final.safetensors")).items():
        assert torch.equal(v, final[k])


def test_a_state_from_elsewhere_needs_a_free_folder(tiny_models, data, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--cache_conditioning", "--dataset_repeat", "2"]
    assert main(flags(tiny_models, data, a, *common, "--max_steps", "2", "--save_steps", "1")) == 0
    assert main(flags(tiny_models, data, b, *common, "--max_steps", "1")) == 0
    state = os.path.join(a, "checkpoints", "step-1")
    assert main(flags(tiny_models, data, b, *common, "--max_steps", "2", "--resume_from_checkpoint", state)) == 2
    assert "holds another run's files" in capsys.readouterr().err
    assert steps_logged(b) == [1]
    c = str(tmp_path / "c")  # a free folder: the run continues there, step 2 on
    assert main(flags(tiny_models, data, c, *common, "--max_steps", "2", "--resume_from_checkpoint", state)) == 0
    assert steps_logged(c) == [2]


def test_lora_checkpoint_that_does_not_fit_is_refused_before_loading(tiny_models, data, tmp_path, capsys):
    """Another --lora_type, DiT layout or --lora_rank than the --lora_checkpoint's: one message naming the fix,
    read from the file before any model loads (it was found only after the DiT had loaded)."""
    first = str(tmp_path / "first")
    assert main(flags(tiny_models, data, first, "--max_steps", "1", "--cache_conditioning")) == 0
    merged = os.path.join(first, "checkpoint-final.safetensors")
    standard = os.path.join(first, "checkpoint-final-standard.safetensors")
    no_models = ["--models_dir", str(tmp_path / "no-models")]
    for lora, extra, message in (
            (merged, ["--lora_type", "loha"], f"{merged} is a lora, not a loha: continue it with --lora_type lora"),
            (merged, ["--lora_rank", "8"], f"{merged} has rank 4, this run --lora_rank 8"),
            (standard, [], f"{standard} was trained on the standard DiT layout, this script trains the merged-QKV "
                           "one: continue it with train.py, or convert it first")):
        code = main(flags(tiny_models, data, str(tmp_path / "second"), "--lora_checkpoint", lora, *extra, *no_models))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
    # the same LoRA (here a copy) as --lora_fused too would apply it twice
    twin = str(tmp_path / "copy.safetensors")
    shutil.copy(merged, twin)
    code = main(flags(tiny_models, data, str(tmp_path / "second"), "--lora_checkpoint", merged, "--lora_fused", twin,
                      *no_models))
    assert code == 2 and f"--lora_checkpoint and --lora_fused are the same LoRA ({merged})" in capsys.readouterr().err
    # and in the other script
    code = main(flags(tiny_models, data, str(tmp_path / "second"), "--lora_checkpoint", merged, *no_models),
                merged_qkv=False)
    assert code == 2 and "this script trains the standard one: continue it with train_merged_qkv.py" in \
        capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (["--lora_alpha", "16"], "--lora_alpha: state 4, this run 16"),
    (["--batch_size", "2"], "--batch_size: state 1, this run 2"),
    (["--dataset_repeat", "3"], "training samples (rows x --max_pixels areas x --dataset_repeat): state 4, this run 6"),
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps: state 1, this run 2"),
    # what each step trains on: resumed with another value, the run would not continue the state's
    (["--timestep_sampling", "uniform"], "--timestep_sampling: state 'diffsynth', this run 'uniform'"),
    (["--caption_dropout_rate", "0.5"], "--caption_dropout_rate: state 0.0, this run 0.5"),
    (["--edit_plus"], "--edit_plus: state False, this run True"),
    (["--edit_image_area", "8192"], "--edit_image_area: state 4096, this run 8192"),
    (["--max_pixels", "8192"], "--max_pixels: state 4096, this run 8192"),
    # how each step updates
    (["--max_grad_norm", "0.5"], "--max_grad_norm: state 1.0, this run 0.5"),
    (["--lr_warmup_steps", "2"], "--lr_warmup_steps: state 0, this run 2"),
    (["--lr_scheduler", "cosine"], "--lr_scheduler: state 'constant', this run 'cosine'"),
])
def test_resume_with_other_settings_is_refused_before_loading(tiny_models, data, tmp_path, capsys, change, message):
    out = str(tmp_path / "out")
    common = ["--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1"]
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "1")) == 0
    code = main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                      *change, "--models_dir", str(tmp_path / "no-models")))  # refused before any model loads
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_state_without_the_training_objective_keys_still_resumes(tiny_models, data, tmp_path, capsys):
    """States written before the sampling and loss options were recorded hold none of them: like any key a state
    lacks, they are not checked, and such a state resumes (a refusal would strand every earlier run)."""
    out = str(tmp_path / "out")
    common = ["--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1"]
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "1")) == 0
    path = os.path.join(out, "checkpoints", "step-1", "state.json")
    manifest = json.load(open(path))
    new = ("edit_plus", "caption_dropout_rate", "max_pixels", "height", "width", "edit_image_area",
           "timestep_sampling", "weighting_scheme", "logit_mean", "logit_std", "discrete_flow_shift",
           "min_timestep", "max_timestep")
    assert set(new) <= set(manifest["setup"])
    manifest["setup"] = {k: v for k, v in manifest["setup"].items() if k not in new}
    json.dump(manifest, open(path, "w"))
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                      "--timestep_sampling", "uniform")) == 0
    assert steps_logged(out) == [1, 2]


def test_resume_without_the_lora_fused_of_its_state_is_refused(tiny_models, data, tmp_path, capsys):
    """The state's LoRA was trained on the DiT with --lora_fused in it: resumed without it (or with another file), the
    run would continue on other weights."""
    first = str(tmp_path / "first")
    assert main(flags(tiny_models, data, first, "--max_steps", "1", "--cache_conditioning")) == 0
    fused = os.path.join(first, "checkpoint-final.safetensors")
    out = str(tmp_path / "out")
    common = ["--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1"]
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "1", "--lora_fused", fused)) == 0
    code = main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                      "--models_dir", str(tmp_path / "no-models")))  # refused before any model loads
    err = capsys.readouterr().err
    assert code == 2 and "--lora_fused (content id; None: not given): state '" in err and "this run None" in err, err
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                      "--lora_fused", fused)) == 0


def test_resume_refuses_another_process_count_and_a_damaged_state(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1", "--models_dir",
              str(tmp_path / "no-models")]
    assert main(flags(tiny_models, data, out, "--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1",
                      "--max_steps", "1")) == 0
    state = os.path.join(out, "checkpoints", "step-1")
    manifest = json.load(open(os.path.join(state, "state.json")))
    json.dump(dict(manifest, num_processes=2), open(os.path.join(state, "state.json"), "w"))
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest")) == 2
    assert "was written by 2 process(es) and this run has 1" in capsys.readouterr().err
    json.dump(manifest, open(os.path.join(state, "state.json"), "w"))
    model = os.path.join(state, "model.safetensors")
    open(model, "r+b").truncate(os.path.getsize(model) // 2)
    assert main(flags(tiny_models, data, out, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest")) == 2
    assert "model.safetensors is missing or damaged" in capsys.readouterr().err


def test_gradient_accumulation_steps_at_each_epochs_end(tiny_models, data, tmp_path, capsys):
    """4 batches per epoch, accumulating 3: a window of 3 and one of 1 per epoch, never one across epochs; the run
    makes the steps its progress bar announced and the lr schedule reaches its end."""
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--cache_conditioning", "--dataset_repeat", "2", "--num_epochs", "2",
                      "--gradient_accumulation_steps", "3", "--lr_scheduler", "linear")) == 0
    with open(os.path.join(out, "train_log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert float(rows[-1]["lr"]) == pytest.approx(2e-3 * 1 / 4)  # linear: the last of 4 steps uses 1/4 of the peak


def test_accumulated_step_logs_the_mean_loss_of_its_window(tiny_models, data, tmp_path, monkeypatch):
    """With --gradient_accumulation_steps 3 and 4 batches an epoch, a step logs the mean loss of its 3 (or, at the
    epoch's end, 1) batches: the loss its update followed, not only its last batch's."""
    import diffsynth.trainers.trainer as trainer_module

    real, seen = trainer_module.flow_matching_loss, []

    def recorded(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen.append(loss.item())
        return loss

    monkeypatch.setattr(trainer_module, "flow_matching_loss", recorded)
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--cache_conditioning", "--dataset_repeat", "2",
                      "--gradient_accumulation_steps", "3")) == 0
    with open(os.path.join(out, "train_log.csv")) as f:
        logged = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(seen) == 4 and len(set(seen)) == 4
    assert logged == pytest.approx([sum(seen[:3]) / 3, seen[3]], abs=1e-6)


def test_interrupt_says_how_to_go_on(tiny_models, data, tmp_path, monkeypatch, capsys):
    import diffsynth.trainers.trainer as trainer_module

    real, calls = trainer_module.flow_matching_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "flow_matching_loss", interrupted)
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--cache_conditioning", "--dataset_repeat", "2", "--save_steps", "1",
                      "--max_steps", "4")) == 130
    state = os.path.join(out, "checkpoints", "step-2")
    assert f"interrupted; the newest training state is {state}: continue with --resume_from_checkpoint latest" \
        in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, ".lock"))  # the folder is free for the resume


def test_launcher_settings_accelerate_cannot_run_a_lora_with(tiny_models, data, tmp_path, monkeypatch, capsys):
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--max_steps", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert main(argv) == 2
    assert "fsdp_activation_checkpointing: true" in capsys.readouterr().err
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")  # on the CPU accelerate itself would stop with a traceback
    assert main(argv) == 2
    assert "asks for FSDP version 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_dry_run_under_a_launcher_plans_for_its_processes_and_prints_once(tiny_models, data, tmp_path, monkeypatch,
                                                                           capsys):
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--dry_run", "--use_gradient_checkpointing")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(argv) == 0
    assert capsys.readouterr() == ("", "")  # the local main process prints
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(argv) == 0
    assert ", 2 processes (FSDP)" in capsys.readouterr().err


def test_settings_that_likely_are_not_meant_are_noted(tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--lr_warmup_steps",
                      "8", "--validation_prompt", "blue", "--validation_inference_steps", "1")) == 0
    printed = capsys.readouterr().out
    assert "--lr_warmup_steps 8 is longer than this run's 2 steps: the rate ends at 25% of --learning_rate" in printed
    assert "--validation_prompt without --validation_edit_image: the validation images are generated" in printed
