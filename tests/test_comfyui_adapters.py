"""Our LoHa / LoKr / DoRA exports through ComfyUI's own weight-adapter code (outside CI: ComfyUI is not on PyPI).

Run with a ComfyUI checkout (its `comfy/` package importable; torchvision is not needed):
    COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/test_comfyui_adapters.py
Each module's weight as ComfyUI patches it (comfy/lora.py's load_lora: `.alpha`, `.dora_scale`, then the first
adapter class that loads the keys, then calculate_weight at strength 1 in float32) must equal the weight of the
standard DiT with our native file fused.
"""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.lora import fuse_lora
from diffsynth.models import load_qwen_image_dit
from diffsynth.trainers import main
from test_trainer import flags

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


def comfy_weight_adapter():
    sys.path.insert(0, COMFYUI_DIR)
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy's argument parser runs at import
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.weight_adapter as weight_adapter

    return weight_adapter


@pytest.mark.parametrize("lora_type", ["loha", "lokr", "dora"])
def test_comfyui_applies_our_export_exactly(tiny_models, data, tmp_path, lora_type):
    weight_adapter = comfy_weight_adapter()
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--learning_rate", "5e-2",
                      "--lora_type", lora_type, "--export_format", "comfyui")) == 0
    lora = load_file(os.path.join(out, "checkpoint-final-comfyui.safetensors"))
    dit = os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer")
    base = dict(load_qwen_image_dit(dit, merged_qkv=False).named_parameters())
    ours = load_qwen_image_dit(dit, merged_qkv=False)
    fuse_lora(ours, os.path.join(out, "checkpoint-final.safetensors"))  # the merged native file
    ours = dict(ours.named_parameters())
    stems = sorted({k.rsplit(".", 1)[0] if k.endswith((".alpha", ".dora_scale")) or "hada_" in k or "lokr_" in k
                    else k.rsplit(".", 2)[0] for k in lora})
    checked = 0
    for x in stems:
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        dora_scale = lora.get(f"{x}.dora_scale")
        adapter = next(a for a in (cls.load(x, lora, alpha, dora_scale, set()) for cls in weight_adapter.adapters)
                       if a is not None)
        name = x.removeprefix("diffusion_model.")
        w = base[f"{name}.weight"].detach().clone().float()
        patched = adapter.calculate_weight(w, name, 1.0, 1.0, None, lambda a: a, torch.float32)
        torch.testing.assert_close(patched, ours[f"{name}.weight"].detach().float(), rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 24  # 8 target modules in each of 2 blocks, to_qkv and add_qkv_proj split into q, k, v
