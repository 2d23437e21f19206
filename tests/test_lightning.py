"""Issue 12: the inference script's --scheduler_preset lightning (4/8-step Lightning LoRAs) against diffusers'
scheduler with the published Lightning config, and end to end on the tiny models."""
import math
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from PIL import Image

from conftest import TINY_MODEL_IDS, load_script
from diffsynth.schedulers import FlowMatchScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")

# lightx2v/Qwen-Image-Lightning's diffusers example (generate_with_diffusers.py): "We use shift=3 in distillation"
LIGHTNING_CONFIG = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


@pytest.mark.parametrize("image_seq_len", [256, 4096, 8192])
@pytest.mark.parametrize("num_steps", [4, 8])
def test_lightning_preset_matches_the_published_scheduler(num_steps, image_seq_len):
    ref = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 8192, math.log(3), math.log(3))
    ref.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = FlowMatchScheduler.from_preset("lightning")
    ours.set_timesteps(num_steps, image_seq_len)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=0)
    # shift 3 at every resolution, not stretched to a terminal sigma of 0.02
    expected = [3 * s / (1 + 2 * s) for s in np.linspace(1.0, 1 / num_steps, num_steps)] + [0.0]
    torch.testing.assert_close(ours.sigmas, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown scheduler preset 'turbo'"):
        FlowMatchScheduler.from_preset("turbo")


def test_inference_script_lightning_preset(tiny_models, tmp_path, monkeypatch, capsys):
    """8 steps, no CFG (one DiT pass per step), the Lightning schedule."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    edit = str(tmp_path / "edit.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(edit)
    calls, sigmas = [], []
    real = QwenImagePipeline.predict

    def spy(self, latents, edit_tokens, shapes, sigma, emb, mask):
        calls.append(float(sigma))
        sigmas.append(self.scheduler.sigmas.clone())
        return real(self, latents, edit_tokens, shapes, sigma, emb, mask)

    monkeypatch.setattr(QwenImagePipeline, "predict", spy)
    script = load_script(SCRIPT, "inference_script")
    common = ["--edit_image", edit, "--prompt", "make it blue", "--model_id_with_origin_paths", TINY_MODEL_IDS,
              "--models_dir", tiny_models, "--edit_image_area", "4096", "--device", "cpu"]
    assert script.main([*common, "--output", str(tmp_path / "fast.png"), "--scheduler_preset", "lightning"]) == 0
    assert len(calls) == 8  # 8 steps, one pass each: true CFG is off
    lightning = FlowMatchScheduler.from_preset("lightning")
    lightning.set_timesteps(8, 16)
    torch.testing.assert_close(sigmas[-1], lightning.sigmas)
    calls.clear()
    assert script.main([*common, "--output", str(tmp_path / "slow.png"), "--num_steps", "4"]) == 0
    assert len(calls) == 8  # the default: 4 steps with true CFG, two passes each
    assert script.main([*common, "--output", str(tmp_path / "cfg.png"), "--scheduler_preset", "lightning",
                        "--num_steps", "4", "--cfg_scale", "2"]) == 0
    assert "distilled to run without CFG" in capsys.readouterr().err


def test_stacked_loras_each_with_its_scale(tiny_models, tmp_path, capsys):
    """Your LoRA and a Lightning LoRA together: --lora_path twice, fused in order with their --lora_scale."""
    from diffsynth.lora import save_lora
    from diffsynth.models import load_qwen_image_dit

    dit = load_qwen_image_dit(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), merged_qkv=True)
    paths = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, module in dit.named_modules():
            if name.endswith("attn.to_out.0"):
                sd[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
                sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
        paths.append(str(tmp_path / f"lora{seed}.safetensors"))
        save_lora(sd, paths[-1], rank=4, alpha=4, target_modules="to_out.0", architecture="merged_qkv")
    edit = str(tmp_path / "edit.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(edit)
    script = load_script(SCRIPT, "inference_script")
    common = ["--edit_image", edit, "--prompt", "make it blue", "--model_id_with_origin_paths", TINY_MODEL_IDS,
              "--models_dir", tiny_models, "--edit_image_area", "4096", "--device", "cpu", "--num_steps", "2",
              "--cfg_scale", "1"]
    assert script.main([*common, "--output", str(tmp_path / "two.png"), "--lora_path", paths[0], "--lora_path",
                        paths[1], "--lora_scale", "1.0", "--lora_scale", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"fused {paths[0]} into 2 layers (scale 1.0)" in out and f"fused {paths[1]} into 2 layers (scale 0.5)" in out
    with pytest.raises(SystemExit):
        script.parse_args([*common, "--lora_path", paths[0], "--lora_scale", "1", "--lora_scale", "2",
                           "--lora_scale", "3"])
