import filecmp
import inspect
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2Tokenizer

from diffsynth.models import load_qwen_image_dit
from diffsynth.models.qwen_image_text_encoder import EDIT_TEMPLATE, T2I_TEMPLATE
from diffsynth.models.qwen_image_vae import load_qwen_image_vae
from diffsynth.utils.io import read_keys_and_shapes, resolve_safetensors_files
from diffsynth.utils.tiny_models import SPECIAL_TOKENS, TINY_DIT_CONFIG, main, reference_pipeline, write_tiny_models

EXPECTED_FILES = {
    "Qwen-Image-Edit/transformer": ["config.json", "diffusion_pytorch_model.safetensors.index.json"],
    "Qwen-Image-Edit/processor": ["preprocessor_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                                  "tokenizer_config.json"],
    "Qwen-Image-Edit/scheduler": ["scheduler_config.json"],
    "Qwen-Image/text_encoder": ["config.json", "model.safetensors.index.json"],
    "Qwen-Image/vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "Qwen-Image/tokenizer": ["vocab.json", "merges.txt", "tokenizer_config.json"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"), seed=0)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_official_layout(tiny):
    root = tiny["root"]
    for folder, names in EXPECTED_FILES.items():
        for name in names:
            assert os.path.isfile(os.path.join(root, folder, name)), f"{folder}/{name} missing"
    assert not [f for f in os.listdir(os.path.dirname(root)) if f.startswith(".tmp")], "temporary folder left"
    # Both big models are sharded with an index naming every shard; shards use the official names.
    for folder, prefix in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        shards = sorted(f for f in os.listdir(tiny[folder]) if f.endswith(".safetensors"))
        assert len(shards) >= 2
        assert shards == [f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        with open(os.path.join(tiny[folder], f"{prefix}.safetensors.index.json")) as f:
            assert sorted(set(json.load(f)["weight_map"].values())) == shards
    with open(os.path.join(tiny["transformer"], "config.json")) as f:
        config = json.load(f)
    assert config["_class_name"] == "QwenImageTransformer2DModel"
    assert {k: config[k] for k in TINY_DIT_CONFIG} == {**TINY_DIT_CONFIG, "axes_dims_rope": [8, 12, 12]}


def test_text_encoder_files_use_the_official_key_layout(tiny):
    keys = read_keys_and_shapes(resolve_safetensors_files(tiny["text_encoder"]))
    official = ("model.layers.", "model.embed_tokens.", "model.norm.", "visual.", "lm_head.")
    assert all(k.startswith(official) for k in keys), [k for k in keys if not k.startswith(official)][:5]
    for prefix in official:
        assert any(k.startswith(prefix) for k in keys), prefix
    with open(os.path.join(tiny["text_encoder"], "config.json")) as f:
        config = json.load(f)
    assert config["hidden_size"] == TINY_DIT_CONFIG["joint_attention_dim"]  # flat, as the official config.json
    assert config["vision_config"]["out_hidden_size"] == config["hidden_size"]
    assert keys["model.embed_tokens.weight"] == (config["vocab_size"], config["hidden_size"])


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = write_tiny_models(tmp_path / "again", seed=0)
    assert _files(again["root"]) == _files(tiny["root"])
    _, mismatch, errors = filecmp.cmpfiles(tiny["root"], again["root"], _files(tiny["root"]), shallow=False)
    assert mismatch == [] and errors == []
    other = write_tiny_models(tmp_path / "other", seed=1)
    name = "diffusion_pytorch_model.safetensors"
    assert not filecmp.cmp(os.path.join(tiny["vae"], name), os.path.join(other["vae"], name), shallow=False)


def test_cli_writes_the_set(tmp_path, capsys):
    main(["--output", str(tmp_path), "--seed", "3"])
    assert "tiny-random" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "tiny-random/Qwen-Image/text_encoder/model.safetensors.index.json")
    assert os.stat(tmp_path / "tiny-random").st_mode & 0o777 == 0o755


def test_tokenizer_has_qwen_special_tokens_and_template_lengths(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    assert isinstance(tokenizer, Qwen2Tokenizer)
    with open(os.path.join(tiny["text_encoder"], "config.json")) as f:
        config = json.load(f)
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert max(ids) < config["vocab_size"] and len(set(ids)) == len(SPECIAL_TOKENS)
    assert ids[SPECIAL_TOKENS.index("<|image_pad|>")] == config["image_token_id"]
    assert ids[SPECIAL_TOKENS.index("<|vision_start|>")] == config["vision_start_token_id"]
    text = EDIT_TEMPLATE.format("make the sky blue, 3 cats & a dog!")
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    # The system prompts are exactly as long as with the real tokenizer (diffusers drops 34 and 64 tokens).
    assert len(tokenizer(T2I_TEMPLATE.split("{}")[0])["input_ids"]) == 34
    assert len(tokenizer(EDIT_TEMPLATE.split("<|vision_start|>")[0])["input_ids"]) == 64


def test_processor_parts_and_chat_template(tiny):
    with open(os.path.join(tiny["text_encoder"], "config.json")) as f:
        vision = json.load(f)["vision_config"]
    image_processor = AutoImageProcessor.from_pretrained(tiny["processor"])
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (
        vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["processor"])
    system = EDIT_TEMPLATE.split("<|im_end|>")[0].removeprefix("<|im_start|>system\n")
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "add a hat"}]}]
    # The chat template renders the Edit prompt exactly as diffusers' hard-coded template string.
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        EDIT_TEMPLATE.format("add a hat")


def test_models_load_through_the_project_loaders(tiny):
    torch.manual_seed(0)
    standard = load_qwen_image_dit(tiny["transformer"], merged_qkv=False)
    merged = load_qwen_image_dit(tiny["transformer"], merged_qkv=True)
    x, txt = torch.randn(1, 16, 64), torch.randn(1, 5, 64)
    kwargs = dict(encoder_hidden_states=txt, encoder_hidden_states_mask=None, timestep=torch.tensor([0.5]),
                  img_shapes=[[(1, 4, 4)]])
    with torch.no_grad():
        out = standard(x, **kwargs)
        torch.testing.assert_close(merged(x, **kwargs), out, rtol=1e-5, atol=1e-5)
        # The random weights are not degenerate: the prediction depends on the latents and on the text.
        assert out.std() > 1e-3
        assert (standard(x + 1, **kwargs) - out).abs().max() > 1e-3
        assert (standard(x, **{**kwargs, "encoder_hidden_states": txt + 1}) - out).abs().max() > 1e-3
    vae = load_qwen_image_vae(tiny["vae"])
    assert vae.config.z_dim == 16 and vae.spatial_compression_ratio == 8
    defaults = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    assert vae.config.latents_mean != defaults["latents_mean"].default
    assert vae.config.latents_std != defaults["latents_std"].default


def test_diffusers_edit_pipeline_runs_on_the_set(tiny):
    # One run: diffusers VAE-encodes the edit image at about 1024x1024 whatever the output size, which dominates.
    pipe = reference_pipeline(tiny, "edit")
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    out = pipe(image=image, prompt="make the sky blue", height=64, width=64, num_inference_steps=2,
               true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 1e-3
