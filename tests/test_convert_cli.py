"""convert_merged_qkv_checkpoint.py as users call it: full checkpoints and LoRAs, both directions, errors."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_diffusers_dit
from diffsynth.utils.io import resolve_safetensors_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples/qwen_image/model_training/utils/convert_merged_qkv_checkpoint.py")


def convert(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_full_checkpoint_round_trip_through_the_cli(tmp_path):
    folder = tmp_path / "transformer"
    random_diffusers_dit().save_pretrained(folder, max_shard_size="60KB")
    original = {}
    for f in resolve_safetensors_files(folder):
        original.update(load_file(f))
    merged = tmp_path / "merged_checkpoint.safetensors"
    r = convert("--input", folder, "--output", merged, "--direction", "to_merged")
    assert r.returncode == 0, r.stderr
    assert "transformer_blocks.0.attn.to_qkv.weight" in load_file(merged)
    standard = tmp_path / "standard_checkpoint.safetensors"
    r = convert("--input", merged, "--output", standard, "--direction", "to_standard")
    assert r.returncode == 0, r.stderr
    back = load_file(standard)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    shards = tmp_path / "shards"
    for replaced in ("", f"replaced the existing {shards}/diffusion_pytorch_model-00001-of-"):
        r = convert("--input", merged, "--output", shards, "--direction", "to_standard", "--max_shard_size", "60KB")
        assert r.returncode == 0 and replaced in r.stdout and ("replaced" in r.stdout) == bool(replaced), r.stdout


def test_lora_through_the_cli(tmp_path):
    g = torch.Generator().manual_seed(0)
    lora = {}
    for b in range(2):
        for name, out_dim in (("attn.to_qkv", 192), ("attn.add_qkv_proj", 192), ("img_mlp.net.2", 64)):
            in_dim = 256 if name == "img_mlp.net.2" else 64
            lora[f"transformer_blocks.{b}.{name}.lora_A.weight"] = torch.randn(4, in_dim, generator=g)
            lora[f"transformer_blocks.{b}.{name}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g)
    merged = tmp_path / "merged_lora.safetensors"
    save_file(lora, merged)
    standard = tmp_path / "standard_lora.safetensors"
    r = convert("--input", merged, "--output", standard, "--direction", "to_standard")
    assert r.returncode == 0, r.stderr
    out = load_file(standard)
    # the default key style is native (bare keys + `.alpha`, read by all four consumers); q, k, v share A and take
    # B's row thirds
    a = out["transformer_blocks.0.attn.to_k.lora_A.weight"]
    assert torch.equal(a, lora["transformer_blocks.0.attn.to_qkv.lora_A.weight"])
    assert torch.equal(out["transformer_blocks.0.attn.to_k.lora_B.weight"],
                       lora["transformer_blocks.0.attn.to_qkv.lora_B.weight"][64:128])
    assert out["transformer_blocks.0.attn.to_k.alpha"].item() == 4.0
    kohya = tmp_path / "kohya.safetensors"
    assert convert("--input", standard, "--output", kohya, "--direction", "to_merged", "--rank", "4",
                   "--format", "kohya").returncode == 0
    # --rank 4 gives back the original rank-4 deltas exactly (up to SVD rounding) and reports the error
    r = convert("--input", standard, "--output", tmp_path / "m.safetensors", "--direction", "to_merged", "--rank", "4")
    assert r.returncode == 0 and "relative" in r.stdout.lower()


def test_cli_errors_leave_no_output(tmp_path):
    r = convert("--input", tmp_path / "missing.safetensors", "--output", tmp_path / "o.safetensors",
                "--direction", "to_merged")
    assert r.returncode == 2 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr
    save_file({"encoder.conv_in.weight": torch.zeros(3)}, tmp_path / "vae.safetensors")
    r = convert("--input", tmp_path / "vae.safetensors", "--output", tmp_path / "o.safetensors",
                "--direction", "to_merged")
    assert r.returncode == 2 and "not a Qwen-Image DiT" in r.stderr
    r = convert("--input", tmp_path / "vae.safetensors", "--output", tmp_path / "o.safetensors",
                "--direction", "sideways")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_output_refusals(tmp_path):
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}
    path = tmp_path / "lora.safetensors"
    save_file(lora, path)
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    cases = [
        (["--output", folder], f"--output {folder} is a folder; name a .safetensors file"),
        (["--output", tmp_path / "lora.pt"], "name a .safetensors file"),
        (["--output", tmp_path / "o.safetensors", "--max_shard_size", "1MB"], "--max_shard_size applies to full DiT"),
    ]
    for flags, message in cases:
        r = convert("--input", path, "--direction", "to_merged", *flags)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "out.safetensors"]
    assert list(folder.iterdir()) == []


def test_replacing_an_output_is_reported(tmp_path):
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}
    save_file(lora, tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    args = ("--input", tmp_path / "lora.safetensors", "--output", out, "--direction", "to_merged")
    first = convert(*args)
    assert first.returncode == 0 and "replaced" not in first.stdout
    again = convert(*args)
    assert again.returncode == 0 and f"replaced the existing {out}" in again.stdout


def test_folder_holding_a_lora_names_the_file(tmp_path):
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}
    (tmp_path / "run").mkdir()
    save_file(lora, tmp_path / "run" / "lora.safetensors")
    r = convert("--input", tmp_path / "run", "--output", tmp_path / "o.safetensors", "--direction", "to_merged")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"--input {tmp_path / 'run'} is a folder holding the LoRA {tmp_path / 'run' / 'lora.safetensors'}; pass " \
           "that file as --input" in r.stderr


def test_full_checkpoint_output_folder_named_safetensors(tmp_path):
    save_file(random_diffusers_dit().state_dict(), tmp_path / "dit.safetensors")
    (tmp_path / "o.safetensors").mkdir()
    r = convert("--input", tmp_path / "dit.safetensors", "--output", tmp_path / "o.safetensors", "--direction",
                "to_merged")
    assert r.returncode == 2 and "is a folder; name a .safetensors file" in r.stderr and "Errno" not in r.stderr


def test_adapter_conversion_never_overwrites_its_input(tmp_path):
    from diffsynth.lora.adapters import save_adapter

    g = torch.Generator().manual_seed(0)
    sd = {f"transformer_blocks.0.attn.to_qkv.hada_{w}": torch.randn(*shape, generator=g)
          for w, shape in (("w1_a", (192, 2)), ("w1_b", (2, 64)), ("w2_a", (192, 2)), ("w2_b", (2, 64)))}
    path = tmp_path / "loha.safetensors"
    save_adapter(sd, str(path), "loha", 2, 2.0, "to_qkv", "merged_qkv")
    before = path.read_bytes()
    r = convert("--input", path, "--output", path, "--direction", "to_standard")
    assert r.returncode == 2 and "is one of the input files" in r.stderr
    assert path.read_bytes() == before


def test_missing_input_is_named_whatever_the_flags(tmp_path):
    """With --format or --rank a mistyped LoRA path was called 'a full DiT checkpoint' (exit 2, no word of the
    missing file); it is named as not found, as without those flags."""
    missing = tmp_path / "checkpoint-final.safetensors"
    for extra in ([], ["--format", "comfyui"], ["--rank", "4"]):
        r = convert("--input", missing, "--output", tmp_path / "out.safetensors", "--direction", "to_standard", *extra)
        assert r.returncode == 2 and f"{missing}: file not found" in r.stderr, (extra, r.stderr)
        assert "full DiT checkpoint" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = convert("--input", empty, "--output", tmp_path / "out.safetensors", "--direction", "to_merged", "--rank", "4")
    assert r.returncode == 2 and "holds no .safetensors file" in r.stderr, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


TRAINING_KEYS = ("base_model", "steps", "epoch", "dataset_size", "edit_image_area")


@pytest.mark.parametrize("lora_type", ["lora", "loha"])
def test_conversion_keeps_the_training_metadata(tiny_models, data, tmp_path, lora_type):
    """The converter wrote only its own metadata: a LoRA from the trainer lost its base model, steps, dataset size
    and the --edit_image_area the inference script defaults to. Those are kept through every conversion; the
    layout, rank and key format are the output's."""
    from conftest import load_script
    from diffsynth.trainers import main as train
    from diffsynth.utils.io import read_metadata
    from test_trainer import flags

    out = str(tmp_path / "run")
    assert train(flags(tiny_models, data, out, "--max_steps", "1", "--cache_conditioning", "--lora_type",
                       lora_type)) == 0
    trained = os.path.join(out, "checkpoint-final.safetensors")
    source = read_metadata(trained)
    assert source["edit_image_area"] == "4096" and source["steps"] == "1" and source["architecture"] == "merged_qkv"
    comfy = tmp_path / "comfy.safetensors"
    r = convert("--input", trained, "--output", comfy, "--direction", "to_standard", "--format", "comfyui")
    assert r.returncode == 0, r.stderr
    files = {comfy: ("standard", "comfyui", "to_standard", "checkpoint-final.safetensors"),
             os.path.join(out, "checkpoint-final-standard.safetensors"):  # the trainer's own copy
                 ("standard", "native", "to_standard", "checkpoint-final.safetensors")}
    if lora_type == "lora":  # LoHa converts to the standard layout only
        back = tmp_path / "back.safetensors"
        assert convert("--input", comfy, "--output", back, "--direction", "to_merged").returncode == 0
        files[back] = ("merged_qkv", "native", "to_merged", "comfy.safetensors")
    for path, (architecture, key_format, direction, converted_from) in files.items():
        meta = read_metadata(path)
        assert {k: meta.get(k) for k in TRAINING_KEYS} == {k: source[k] for k in TRAINING_KEYS}, path
        assert (meta["architecture"], meta["key_format"], meta["direction"], meta["converted_from"]) == (
            architecture, key_format, direction, converted_from), path
        assert meta.get("lora_type") == (None if lora_type == "lora" else lora_type), path
    if lora_type == "lora":
        assert read_metadata(back)["rank"] == "12"  # the exact merged rank: 3 x 4, not the source's 4
    # the inference script takes its default edit image area from the converted file
    infer = load_script(os.path.join(ROOT, "examples/qwen_image/model_inference/"
                                           "Qwen-Image-Edit-LoRA-MergedQKV-Inference.py"), "infer_convert")
    args = argparse.Namespace(lora_path=[str(comfy)], edit_image_area=None)
    infer.resolve_edit_image_area(args)
    assert args.edit_image_area == 4096


def test_conversion_drops_other_tools_metadata(tmp_path):
    """Another tool's metadata (kohya's rank and alpha fields) would be false once the scale is folded into the
    weights: it is not carried over."""
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}
    save_file(lora, tmp_path / "kohya.safetensors", {"ss_network_dim": "4", "ss_network_alpha": "1"})
    r = convert("--input", tmp_path / "kohya.safetensors", "--output", tmp_path / "o.safetensors",
                "--direction", "to_merged")
    assert r.returncode == 0, r.stderr
    from diffsynth.utils.io import read_metadata

    meta = read_metadata(tmp_path / "o.safetensors")
    assert "ss_network_dim" not in meta and meta["rank"] == "4" and meta["alpha"] == "4.0"
