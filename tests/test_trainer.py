"""The trainer on the tiny models: learning, checkpoints, errors, fp8, batches, cache, resume, NaN guard."""
import csv
import os

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_MODEL_IDS
from diffsynth.trainers import Trainer, main, parse_args
from diffsynth.utils.demo_data import write_edit_dataset


def flags(tiny_models, data, out, *extra, merged=True):
    return ["--dataset_base_path", data, "--dataset_metadata_path", os.path.join(data, "metadata.csv"),
            "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models,
            "--max_pixels", "4096", "--edit_image_area", "4096", "--output_path", out,
            "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "2e-3", *extra]


def losses(out):
    with open(os.path.join(out, "train_log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def fixed_loss(trainer, seed=123):
    """The loss on the first sample at fixed noise and sigmas: comparable before and after training."""
    from diffsynth.trainers.trainer import flow_matching_loss

    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=1,
                                                  collate_fn=__import__("diffsynth.trainers.dataset",
                                                                        fromlist=["collate_fn"]).collate_fn)))
    cond = trainer.conditions(batch)
    total = 0.0
    with torch.no_grad():
        for i in range(8):
            total += flow_matching_loss(trainer.dit, trainer.pipe.scheduler, cond,
                                        torch.Generator().manual_seed(seed + i)).item()
    return total / 8


@pytest.mark.parametrize("merged", [True, False])
def test_training_lowers_the_loss_and_writes_checkpoints(tiny_models, tmp_path, merged):
    data = str(tmp_path / "one")
    write_edit_dataset(data, num_samples=1)  # one sample, repeated
    out = str(tmp_path / "out")
    args = parse_args(flags(tiny_models, data, out, "--num_epochs", "2", "--dataset_repeat", "15",
                            "--learning_rate", "1e-2", "--cache_conditioning", "--export_format", "diffusers"),
                      merged_qkv=merged)
    trainer = Trainer(args)
    trainer.setup()
    before = fixed_loss(trainer)
    final = trainer.train()
    after = fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)
    assert final == os.path.join(out, "checkpoint-final.safetensors")
    for name in ("checkpoint-final.safetensors", "epoch-1.safetensors", "epoch-2.safetensors", "loss.png",
                 "train_log.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert len(losses(out)) == 30
    with safe_open(final, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["architecture"] == ("merged_qkv" if merged else "standard")
    assert meta["rank"] == "4" and meta["steps"] == "30"
    assert meta["edit_image_area"] == "4096"  # what the inference script sizes edit images to by default
    assert any(("to_qkv" if merged else "to_q") + ".lora_A.weight" in k for k in keys)
    # the standard-layout export (diffusers keys) carries the training metadata too
    with safe_open(os.path.join(out, "checkpoint-final-diffusers.safetensors"), "pt") as f:
        exported, keys = f.metadata(), list(f.keys())
    assert exported["architecture"] == "standard" and exported["steps"] == "30" and exported["dataset_size"] == "1"
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in keys
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_checkpoint_changes_the_pipeline_output(tiny_models, data, tmp_path):
    from PIL import Image

    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "3", "--learning_rate", "5e-2")) == 0
    pipe = QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, merged_qkv=True)
    edit = Image.open(os.path.join(data, "edits", "edit000.png"))
    kwargs = dict(edit_image=edit, seed=0, num_inference_steps=2, edit_image_area=4096, output_type="latent",
                  progress=False)
    before = pipe("make the red square blue", **kwargs)
    pipe.load_lora(os.path.join(out, "checkpoint-final.safetensors"))
    after = pipe("make the red square blue", **kwargs)
    assert (after - before).abs().max() > 1e-4


def test_bad_dataset_rows_fail_before_models_load(tiny_models, tmp_path, capsys):
    folder = tmp_path / "data"
    write_edit_dataset(str(folder), num_samples=3)
    (folder / "images" / "img001.png").unlink()
    (folder / "edits" / "edit002.png").write_bytes(b"not an image")
    out = str(tmp_path / "out")
    code = main(flags(tiny_models, str(folder), out, "--models_dir", str(tmp_path / "no-models-here")))
    err = capsys.readouterr().err
    assert code == 2
    assert "img001.png" in err and "edit002.png" in err and "row 2" in err and "row 3" in err
    assert not os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))


def test_wrong_lora_targets_stop_before_any_model_loads(tiny_models, data, tmp_path, capsys, monkeypatch):
    """Checked against the DiT's file headers, in each script's q/k/v layout: the DiT never loads."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", no_loading)
    out = str(tmp_path / "out")
    for merged, targets, fix in ((True, "to_q,to_k,to_v", "to_q -> to_qkv"),
                                 (False, "to_qkv,to_out.0", "to_qkv -> to_q,to_k,to_v")):
        code = main(flags(tiny_models, data, out, "--lora_target_modules", targets), merged_qkv=merged)
        err = capsys.readouterr().err
        assert code == 2, err  # a user-fixable error
        assert f"--lora_target_modules {targets}: Module" in err and fix in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "train_log.csv"))


@pytest.mark.parametrize("merged, targets, hint", [(True, "to_q,to_k,to_v", "to_q -> to_qkv"),
                                                   (False, "to_qkv", "to_qkv -> to_q,to_k,to_v")])
def test_wrong_lora_targets_fail_the_dry_run_before_models_load(tiny_models, data, tmp_path, capsys, merged, targets,
                                                                hint):
    """The dry run said 'the flags ... check out' (planning a 0.0M-parameter LoRA), and the run found the names wrong
    only after every model had loaded and the conditioning cache had filled."""
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--lora_target_modules", targets,
                 "--cache_conditioning", "--models_dir", str(tmp_path / "no-models"))
    for extra in (["--dry_run"], []):  # no models in --models_dir: an error from loading would say so instead
        code = main(argv + extra, merged_qkv=merged)
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"--lora_target_modules {targets}: Module" in err and "not found in LoRA target modules" in err \
            and hint in err
        assert not os.path.exists(tmp_path / "out" / "cache")


@pytest.mark.parametrize("bad, message", [
    (["--unknown_flag", "1"], "unrecognized arguments: --unknown_flag"),
    (["--lora_rank"], "expected one argument"),
    (["--height", "64"], "--height and --width go together"),
    # without a validation prompt nothing validates: the validation flags would do nothing
    (["--validation_inference_steps", "8"], "--validation_inference_steps needs --validation_prompt"),
    (["--validation_at_start"], "--validation_at_start needs --validation_prompt"),
    (["--validation_negative_prompt", "ugly"], "--validation_negative_prompt needs --validation_prompt"),
    (["--validation_prompt", "x", "--validation_cfg_scale", "0.5"], "--validation_cfg_scale must be >= 1 (got 0.5"),
    (["--validation_prompt", "x", "--validation_cfg_scale", "1", "--validation_negative_prompt", "ugly"],
     "--validation_negative_prompt would do nothing with --validation_cfg_scale 1 (no CFG)"),
    # flags() passes --edit_image_area 4096: a run without edit images has nothing for it to size
    (["--extra_inputs", ""], "--edit_image_area 4096 would do nothing: it sizes edit images, and this run has none"),
    (["--validation_steps", "2", "--validation_inference_steps", "8"],
     "--validation_steps / --validation_inference_steps need --validation_prompt"),
    # flags() passes --max_pixels 4096: a fixed size leaves it nothing to do
    (["--height", "64", "--width", "32"], "--max_pixels 4096 would do nothing: --height 64 --width 32 fix every"),
    (["--use_gradient_checkpointing_offload"], "needs --use_gradient_checkpointing"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--blocks_to_checkpoint", "1"], "--blocks_to_checkpoint needs --use_gradient_checkpointing"),
    (["--use_gradient_checkpointing", "--blocks_to_checkpoint", "0"], "--blocks_to_checkpoint must be >= 1 (got 0)"),
    (["--use_gradient_checkpointing", "--blocks_to_checkpoint", "half"],
     "--blocks_to_checkpoint 'half': give a number of blocks, or auto"),
    (["--blocks_to_checkpoint", "auto"], "--blocks_to_checkpoint needs --use_gradient_checkpointing"),
    (["--use_gradient_checkpointing", "--blocks_to_checkpoint", "1", "--blocks_to_swap", "2"],
     "--blocks_to_checkpoint 1 is fewer than --blocks_to_swap 2: a swapped block must be checkpointed"),
    (["--checkpoints_total_limit", "2"], "--checkpoints_total_limit needs --save_steps"),
    (["--max_steps", "4", "--lora_files_total_limit", "2"],
     "--lora_files_total_limit 2 would do nothing: this run writes no intermediate weight files"),
    (["--save_steps", "1", "--lora_files_total_limit", "0"], "--lora_files_total_limit must be >= 1 (got 0)"),
    # a run counted in steps writes no epoch files, and a run of 2 epochs none every 3
    (["--max_steps", "4", "--save_every_n_epochs", "0"],
     "--save_every_n_epochs 0 would do nothing: a run whose length is --max_steps alone saves no epochs"),
    (["--num_epochs", "2", "--save_every_n_epochs", "3"],
     "--save_every_n_epochs 3 would do nothing: the run has 2 epoch(s)"),
    (["--save_every_n_epochs", "2"], "--save_every_n_epochs 2 would do nothing: the run has 1 epoch(s)"),
    (["--num_epochs", "2", "--save_every_n_epochs", "-1"], "--save_every_n_epochs must be >= 0 (got -1"),
    (["--edit_plus", "--extra_inputs", "", "--data_file_keys", "image"], "--edit_plus picks the prompt template of edit"),
])
def test_bad_flags_exit_with_a_message(tiny_models, data, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), *bad))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_fp8_halves_weight_memory_and_trains(tiny_models, data, tmp_path):
    from diffsynth.utils.fp8 import weight_bytes

    out = str(tmp_path / "out")
    args = parse_args(flags(tiny_models, data, out, "--num_epochs", "10", "--cache_conditioning",
                            "--enable_fp8_training", "--mixed_precision", "no"))
    trainer = Trainer(args)
    trainer.setup()
    fp8_bytes = weight_bytes(trainer.dit)
    from diffsynth.models import load_qwen_image_dit

    reference = load_qwen_image_dit(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), True,
                                    torch.bfloat16)
    assert fp8_bytes < 0.65 * weight_bytes(reference)  # bf16 baseline; fp8 + per-row scales + fp32 LoRA
    before = fixed_loss(trainer)
    trainer.train()
    trained = losses(out)
    assert all(torch.isfinite(torch.tensor(trained)))
    assert fixed_loss(trainer) < before


def test_auto_checkpointing_needs_a_lora_run(tiny_models, data, tmp_path, capsys):
    argv = [a for a in flags(tiny_models, data, str(tmp_path / "out"), "--use_gradient_checkpointing",
                             "--blocks_to_checkpoint", "auto") if a not in ("--lora_base_model", "dit")]
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "--blocks_to_checkpoint auto asks the VRAM planner, which plans LoRA runs" in capsys.readouterr().err


@pytest.mark.parametrize("extra, flag", [([], "--lora_rank"), (["--lora_alpha", "8"], "--lora_alpha"),
                                         (["--lora_target_modules", "to_qkv"], "--lora_target_modules")])
def test_lora_flags_without_a_lora_are_refused(tiny_models, data, tmp_path, capsys, extra, flag):
    """Without --lora_base_model the whole DiT is fine-tuned: a LoRA's rank, alpha or targets would do nothing."""
    argv = [a for a in flags(tiny_models, data, str(tmp_path / "out"), *extra) if a not in ("--lora_base_model", "dit")]
    if flag != "--lora_rank":
        argv.remove("--lora_rank"), argv.remove("4")
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert f"{flag} needs --lora_base_model dit (without it the whole DiT is fine-tuned)" in capsys.readouterr().err


def test_full_fine_tuning_writes_a_loadable_dit(tiny_models, data, tmp_path):
    from diffsynth.models import load_qwen_image_dit

    out = str(tmp_path / "out")
    argv = [a for a in flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning")
            if a not in ("--lora_base_model", "dit", "--lora_rank", "4")]
    assert main(argv) == 0
    path = os.path.join(out, "checkpoint-final.safetensors")
    model = load_qwen_image_dit(path, merged_qkv=False)  # merged-QKV checkpoint, split on load
    base = load_qwen_image_dit(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), merged_qkv=False)
    changed = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) > 10


def test_lora_fused_and_lora_checkpoint(tiny_models, data, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffsynth.lora import lora_to_standard, to_format
    from diffsynth.utils.io import save_safetensors

    first = str(tmp_path / "first")
    assert main(flags(tiny_models, data, first, "--max_steps", "2", "--cache_conditioning",
                      "--learning_rate", "5e-2")) == 0
    trained = os.path.join(first, "checkpoint-final.safetensors")
    # a pretrained LoRA in the standard layout and kohya format, fused into the merged DiT before training
    kohya = str(tmp_path / "pretrained_kohya.safetensors")
    save_safetensors(to_format(lora_to_standard(trained), "kohya"), kohya)
    second = str(tmp_path / "second")
    assert main(flags(tiny_models, data, second, "--max_steps", "1", "--cache_conditioning",
                      "--lora_fused", kohya)) == 0
    # 8 targets x 2 blocks; the q/k/v deltas of the standard file land in to_qkv / add_qkv_proj
    assert "fused 16 LoRA deltas from" in capsys.readouterr().out
    # continuing from a checkpoint starts from its weights: with a vanishing learning rate they come back unchanged
    third = str(tmp_path / "third")
    assert main(flags(tiny_models, data, third, "--max_steps", "1", "--cache_conditioning",
                      "--lora_checkpoint", trained, "--learning_rate", "1e-30", "--weight_decay", "0")) == 0
    before, after = load_file(trained), load_file(os.path.join(third, "checkpoint-final.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-12)


def test_lr_warmup_counts_optimizer_steps(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "4", "--lr_warmup_steps", "4", "--learning_rate", "1e-3",
                      "--gradient_accumulation_steps", "2", "--dataset_repeat", "4", "--cache_conditioning")) == 0
    with open(os.path.join(out, "train_log.csv")) as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # step s (from 0) uses (s + 1) / 4 of the peak


def test_lr_warmup_as_a_fraction_of_the_run(tiny_models, data, tmp_path, capsys):
    """musubi-tuner's --lr_warmup_steps 0.5: half of the run's optimizer steps, rounded down (5 steps: 2)."""
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "5", "--lr_warmup_steps", "0.5", "--learning_rate",
                      "1e-3", "--cache_conditioning")) == 0
    assert "lr warm-up: 2 of this run's 5 steps (--lr_warmup_steps 0.5)" in capsys.readouterr().out
    with open(os.path.join(out, "train_log.csv")) as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_a_state_written_at_the_end_continues_the_run_exactly(tiny_models, data, tmp_path):
    """--save_state_on_train_end: a 2-step run leaves checkpoints/step-2 (no --save_steps); resumed with
    --max_steps 4 it gives the LoRA of a 4-step run to the bit, and leaves its own end state, step-4."""
    from safetensors.torch import load_file

    common = ("--cache_conditioning", "--save_state_on_train_end")
    out, straight = str(tmp_path / "out"), str(tmp_path / "straight")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", *common)) == 0
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-2"]
    assert main(flags(tiny_models, data, out, "--max_steps", "4", "--resume_from_checkpoint", "latest", *common)) == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-2", "step-4"]
    assert main(flags(tiny_models, data, straight, "--max_steps", "4", "--cache_conditioning", "--save_steps", "2",
                      "--save_state_on_train_end")) == 0
    # --save_steps already wrote the last step's state: the end adds none
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["step-2", "step-4"]
    a, b = (load_file(os.path.join(d, "checkpoint-final.safetensors")) for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
