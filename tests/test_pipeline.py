"""QwenImagePipeline on the tiny model set. The oracle is diffusers' QwenImageEditPipeline over the same files
(same weights, same initial noise); merged and standard DiT give the same image; LoRA, offload, sizes,
image-to-image, and loading errors."""
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY_MODEL_IDS
from diffsynth.lora import LoraError
from diffsynth.models.qwen_image_vae import pack_latents
from diffsynth.pipelines.qwen_image import QwenImagePipeline
from diffsynth.utils.io import WeightFileError
from diffsynth.utils.tiny_models import reference_pipeline

PROMPT = "make the sky blue and add a dog"
NEGATIVE = "blurry, low quality"
SMALL_AREA = 128 * 128  # VAE area of the edit image in the fast tests (diffusers always uses 1024 x 1024)
H, W, STEPS = 64, 96, 2
LAYOUT = {"transformer": "Qwen-Image-Edit/transformer", "processor": "Qwen-Image-Edit/processor",
          "scheduler": "Qwen-Image-Edit/scheduler", "text_encoder": "Qwen-Image/text_encoder",
          "vae": "Qwen-Image/vae", "tokenizer": "Qwen-Image/tokenizer"}


def make_image(seed=0, size=(80, 48)):
    """Gradients plus noise, not square: resizes, the VAE and the VL model all see structure and an aspect."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200 + np.random.RandomState(seed).rand(h, w, 3) * 55
    return Image.fromarray(rgb.astype("uint8"))


EDIT = make_image()


def noise(height=H, width=W, seed=1):
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def load(models_dir, merged=True, **kwargs):
    return QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=models_dir, merged_qkv=merged,
                                             download=False, **kwargs)


@pytest.fixture(scope="module")
def ref(tiny_models):
    pipe = reference_pipeline({k: os.path.join(tiny_models, "tiny-random", v) for k, v in LAYOUT.items()}, "edit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {merged: load(tiny_models, merged) for merged in (True, False)}


def run_reference(ref, latents, **kwargs):
    """diffusers' pipeline -> (its final packed latents, the uint8 image it decodes from them)."""
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    image = ref(image=EDIT, true_cfg_scale=4.0, height=H, width=W, num_inference_steps=STEPS,
                latents=pack_latents(latents), output_type="np", callback_on_step_end=keep_latents, **kwargs)
    return final["latents"], (image.images[0] * 255).round().astype(np.int16)


def run_ours(pipe, latents, negative, edit_image_area):
    out = pipe(PROMPT, edit_image=EDIT, negative_prompt=negative, cfg_scale=4.0, height=H, width=W,
               num_inference_steps=STEPS, latents=latents, edit_image_area=edit_image_area, output_type="latent",
               progress=False)
    return out, pixels(pipe.decode(out, H, W))


def assert_same(ours, reference):
    (lat, img), (ref_lat, ref_img) = ours, reference
    torch.testing.assert_close(lat, ref_lat, rtol=1e-5, atol=1e-5)
    assert np.abs(img - ref_img).max() <= 1  # rounding to 8 bits may flip a level


@pytest.mark.slow  # two VAE encodes of a 1024 x 1024 edit image: about 12 s on one core
def test_matches_diffusers_at_the_default_edit_size(ref, pipes):
    """diffusers untouched: VAE and VL model both see the edit image at 1024 x 1024 area; true CFG on."""
    latents = noise()
    reference = run_reference(ref, latents, prompt=PROMPT, negative_prompt=" ")
    assert_same(run_ours(pipes[True], latents, " ", 1024 * 1024), reference)


@pytest.fixture
def small_area_reference(ref, monkeypatch):
    """diffusers with its VAE edit size set to SMALL_AREA; its VL model still sees the edit image at 1024 x 1024
    (prompt embeddings from diffusers' own encode_prompt), as our pipeline does with edit_image_area=SMALL_AREA."""
    calculate = pipeline_qwenimage_edit.calculate_dimensions
    width, height, _ = calculate(1024 * 1024, EDIT.width / EDIT.height)
    vl_image = ref.image_processor.resize(EDIT, height, width)

    def run(latents, negative):
        kwargs = dict(zip(("prompt_embeds", "prompt_embeds_mask"), ref.encode_prompt(PROMPT, image=vl_image)))
        if negative is not None:
            kwargs.update(zip(("negative_prompt_embeds", "negative_prompt_embeds_mask"),
                              ref.encode_prompt(negative, image=vl_image)))
        return run_reference(ref, latents, **kwargs)

    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: calculate(SMALL_AREA, ratio))
    return run


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "standard"])
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no_cfg", "true_cfg"])
def test_matches_diffusers(small_area_reference, pipes, merged, negative):
    latents = noise()
    assert_same(run_ours(pipes[merged], latents, negative, SMALL_AREA), small_area_reference(latents, negative))


def test_merged_and_standard_give_the_same_image(pipes):
    assert hasattr(pipes[True].dit.transformer_blocks[0].attn, "to_qkv")
    assert hasattr(pipes[False].dit.transformer_blocks[0].attn, "to_q")
    latents = noise()
    merged = run_ours(pipes[True], latents, NEGATIVE, SMALL_AREA)
    assert_same(merged, run_ours(pipes[False], latents, NEGATIVE, SMALL_AREA))
    # The tolerance above is far below what the prompt and CFG change: the comparisons are not vacuous.
    without_cfg = run_ours(pipes[True], latents, None, SMALL_AREA)[0]
    assert (without_cfg - merged[0]).abs().max() > 20 * 1e-5


def test_offload_gives_the_same_image(tiny_models, pipes):
    offloaded = load(tiny_models, offload=True)
    assert offloaded.offload and not pipes[True].offload
    latents = noise()
    for negative in (None, NEGATIVE):
        a, img_a = run_ours(offloaded, latents, negative, SMALL_AREA)
        b, img_b = run_ours(pipes[True], latents, negative, SMALL_AREA)
        assert torch.equal(a, b) and np.array_equal(img_a, img_b)
    assert all(p.device.type == "cpu" for p in offloaded.dit.parameters())


def write_lora(path, dit_config, rank=4, seed=0):
    """A standard-layout LoRA in diffusers' key format (what other trainers save), random non-zero weights."""
    d = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(dit_config["num_layers"]):
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"):
            key = f"transformer.transformer_blocks.{block}.attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(d, rank, generator=g) * 0.1
    save_file(tensors, path)
    return path


def test_lora_changes_the_output_in_either_layout(tiny_models, pipes, tmp_path):
    lora = write_lora(str(tmp_path / "lora.safetensors"), pipes[True].dit.config)
    latents = noise()
    base = run_ours(pipes[True], latents, None, SMALL_AREA)[0]
    outputs = []
    for merged in (True, False):
        pipe = load(tiny_models, merged)
        changed = pipe.load_lora(lora, scale=1.0)
        assert len(changed) == (3 if merged else 7) * pipe.dit.config["num_layers"]  # q, k, v in one layer if merged
        outputs.append(run_ours(pipe, latents, None, SMALL_AREA)[0])
    assert (outputs[0] - base).abs().max() > 1e-3
    # The standard-layout LoRA lands in the row slices of to_qkv / add_qkv_proj: same image as on the standard DiT.
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_lora_for_another_model_is_a_clear_error(tiny_models, tmp_path):
    path = str(tmp_path / "other.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(3072, 4)}, path)
    pipe = load(tiny_models)
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    with pytest.raises(LoraError, match="transformer_blocks.0.attn.to_q"):
        pipe.load_lora(path)
    assert all(torch.equal(v, pipe.dit.state_dict()[k]) for k, v in before.items())  # nothing half-fused


def test_sizes_seed_and_image_to_image(pipes):
    pipe = pipes[True]
    kwargs = dict(edit_image=EDIT, num_inference_steps=2, cfg_scale=1.0, edit_image_area=SMALL_AREA, progress=False)
    # Default size: the edit image's at the VAE area (80x48 -> 160x96); explicit sides round down to 16.
    assert pipe(PROMPT, seed=0, **kwargs).size == (160, 96)
    assert pipe(PROMPT, seed=0, height=70, width=90, **kwargs).size == (80, 64)
    kwargs.update(height=H, width=W, output_type="latent")
    first = pipe(PROMPT, seed=0, **kwargs)
    assert torch.equal(first, pipe(PROMPT, seed=0, **kwargs))
    assert torch.equal(first, pipe(PROMPT, latents=torch.randn(1, 16, H // 8, W // 8,
                                                                generator=torch.Generator().manual_seed(0)), **kwargs))
    assert not torch.equal(first, pipe(PROMPT, seed=1, **kwargs))
    # At strength 1 the init image is unused; below 1 the result starts from it.
    assert torch.equal(first, pipe(PROMPT, seed=0, input_image=make_image(1), **kwargs))
    a = pipe(PROMPT, seed=0, input_image=make_image(1), denoising_strength=0.5, **kwargs)
    b = pipe(PROMPT, seed=0, input_image=make_image(2, (64, 64)), denoising_strength=0.5, **kwargs)
    assert (a - b).abs().max() > 1e-3 and (a - first).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"latents of shape \(1, 16, 4, 4\).*expected \(1, 16, 8, 12\)"):
        pipe(PROMPT, latents=torch.zeros(1, 16, 4, 4), **kwargs)


# ---- loading errors -------------------------------------------------------------------------------------------


def copy_models(tiny_models, tmp_path, without=()):
    """A copy of the tiny set without some files or folders (relative to tiny-random/)."""
    root = tmp_path / "models"
    shutil.copytree(os.path.join(tiny_models, "tiny-random"), root / "tiny-random")
    for rel in without:
        path = root / "tiny-random" / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return str(root)


def test_wrong_models_dir_names_the_expected_paths(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(WeightFileError) as e:
        load(str(where))
    message = str(e.value)
    assert f"{where}/tiny-random/Qwen-Image-Edit/transformer/diffusion_pytorch_model*.safetensors" in message
    assert "downloads are disabled" in message and "--models_dir" in message


def test_offline_with_files_missing_names_the_paths(tiny_models, tmp_path, offline):
    models = copy_models(tiny_models, tmp_path, without=["Qwen-Image/vae"])
    with pytest.raises(WeightFileError) as e:
        QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=models, download=True)
    message = str(e.value)
    assert f"{models}/tiny-random/Qwen-Image/vae/diffusion_pytorch_model.safetensors" in message
    assert "download failed (ConnectionError: cannot reach modelscope.cn" in message
    # Only the missing set was fetched, with its config beside it.
    assert offline == [("tiny-random/Qwen-Image", {
        "local_dir": f"{models}/tiny-random/Qwen-Image",
        "allow_patterns": ["vae/diffusion_pytorch_model.safetensors", "vae/*.json"]})]


def test_offline_with_tokenizer_missing(tiny_models, tmp_path, offline):
    models = copy_models(tiny_models, tmp_path, without=["Qwen-Image/tokenizer"])
    with pytest.raises(WeightFileError, match=f"{models}/tiny-random/Qwen-Image/tokenizer is missing"):
        QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=models, download=True)


def test_partial_shard_set_names_the_missing_shard(tiny_models, tmp_path):
    folder = os.path.join(tiny_models, "tiny-random", LAYOUT["transformer"])
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    models = copy_models(tiny_models, tmp_path, without=[f"{LAYOUT['transformer']}/{shard}"])
    with pytest.raises(WeightFileError, match="incomplete sharded file set") as e:
        load(models)
    assert f"{models}/tiny-random/{LAYOUT['transformer']}/{shard}" in str(e.value)


def test_unknown_file_and_missing_model_paths(tiny_models, tmp_path):
    unknown = str(tmp_path / "random.safetensors")
    save_file({"some.weight": torch.randn(3, 3)}, unknown)
    dit = os.path.join(tiny_models, "tiny-random", LAYOUT["transformer"])
    with pytest.raises(WeightFileError, match=f"{unknown}: not a Qwen-Image model file set"):
        QwenImagePipeline.from_pretrained(model_paths=[dit, unknown], download=False)
    gone = str(tmp_path / "gone.safetensors")
    with pytest.raises(WeightFileError, match=f"1 path\\(s\\) not found: {gone}"):
        QwenImagePipeline.from_pretrained(model_paths=f'["{dit}", "{gone}"]', download=False)
    with pytest.raises(ValueError, match="no text_encoder / vae among the model files"):
        QwenImagePipeline.from_pretrained(model_paths=[dit], download=False)
