import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.models.qwen_image_text_encoder import (
    QwenImageTextEncoder,
    fit_area,
    load_qwen_image_text_encoder,
    to_current_layout,
)
from diffsynth.utils.io import WeightFileError, load_safetensors, resolve_safetensors_files, save_safetensors
from diffsynth.utils.tiny_models import reference_pipeline, write_tiny_models


def _image(w, h, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="module")
def encoder(tiny):
    return QwenImageTextEncoder.from_pretrained(tiny["text_encoder"], tiny["tokenizer"], tiny["processor"],
                                                torch_dtype=torch.float32)


def _assert_same(ours, theirs):
    (embeds, mask), (ref_embeds, ref_mask) = ours, theirs
    assert embeds.shape == ref_embeds.shape
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=1e-5)
    if ref_mask is None:
        assert mask is None
    else:
        assert mask.dtype == ref_mask.dtype and torch.equal(mask, ref_mask)


def test_edit_template_matches_diffusers(tiny, encoder):
    pipe = reference_pipeline(tiny, "edit")
    image = _image(80, 48, 0)
    # diffusers' __call__ shows the VL model the edit image resized to about 1024x1024; we resize inside encode.
    w, h = fit_area(*image.size, 1024 * 1024)
    prompt_image = pipe.image_processor.resize(image, h, w)
    ours = encoder.encode("make the sky blue", image, template="edit")
    _assert_same(ours, pipe.encode_prompt("make the sky blue", image=prompt_image, device="cpu"))
    assert ours[1] is None  # one sample, nothing padded: the DiT gets no mask
    # A batch with prompts of different lengths is padded, with the mask marking the padding.
    images = [_image(64, 64, 1), _image(64, 64, 2)]
    prompts = ["add a dog", "turn it into an oil painting of a house in the snow"]
    ours = encoder.encode(prompts, images, template="edit")
    theirs = pipe.encode_prompt(prompts, image=[pipe.image_processor.resize(i, 1024, 1024) for i in images],
                                device="cpu")
    _assert_same(ours, theirs)
    assert ours[1].dtype == torch.long and ours[1][0].sum() < ours[1][1].sum() == ours[0].shape[1]
    assert ours[0][0, ours[1][0] == 0].abs().max() == 0  # padded rows are zeros


def test_edit_plus_template_matches_diffusers(tiny, encoder):
    pipe = reference_pipeline(tiny, "edit-plus")
    images = [_image(96, 64, 3), _image(48, 64, 4)]
    # diffusers' Edit-Plus __call__ shows each image to the VL model at about 384x384.
    condition = [pipe.image_processor.resize(i, fit_area(*i.size, 384 * 384)[1], fit_area(*i.size, 384 * 384)[0])
                 for i in images]
    ours = encoder.encode("put the hat from picture 2 on the cat", images, template="edit-plus")
    _assert_same(ours, pipe.encode_prompt("put the hat from picture 2 on the cat", image=condition, device="cpu"))
    # One image is "Picture 1:" alone, and differs from the plain Edit template.
    single = encoder.encode("add a hat", images[:1], template="edit-plus")[0]
    assert single.shape != encoder.encode("add a hat", images[0], template="edit")[0].shape


def test_text_to_image_template_matches_diffusers(tiny, encoder):
    pipe = reference_pipeline(tiny, "qwen-image")
    prompts = ["a cat", "a photo of a house in the snow, 4k"]
    _assert_same(encoder.encode(prompts), pipe.encode_prompt(prompts, device="cpu"))
    _assert_same(encoder.encode("a cat"), pipe.encode_prompt("a cat", device="cpu"))


def test_loads_official_and_current_key_layouts(tiny, tmp_path):
    official = load_qwen_image_text_encoder(tiny["text_encoder"], torch_dtype=torch.float32)
    # The current transformers layout, as a single file (e.g. a model saved by transformers >= 4.52).
    state_dict = {}
    for file in resolve_safetensors_files(tiny["text_encoder"]):
        state_dict.update({to_current_layout(k): v for k, v in load_safetensors(file).items()})
    assert set(state_dict) == set(official.state_dict())  # that is the layout transformers builds
    assert any(k.startswith("model.language_model.layers.") for k in state_dict)
    save_safetensors(state_dict, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(tiny["text_encoder"], "config.json"), tmp_path / "config.json")
    current = load_qwen_image_text_encoder(tmp_path / "model.safetensors", torch_dtype=torch.float32)
    for key, value in official.state_dict().items():
        assert torch.equal(current.state_dict()[key], value), key
    assert not any(p.requires_grad for p in current.parameters()) and not current.training


def test_bf16_keeps_rotary_buffers_float32(tiny):
    model = load_qwen_image_text_encoder(tiny["text_encoder"], torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


def test_unknown_and_broken_files_are_clear_errors(tiny, tmp_path):
    config = os.path.join(tiny["text_encoder"], "config.json")
    # A VAE file given as the text encoder: keys listed, both ways.
    vae_dir = tmp_path / "vae_as_te"
    vae_dir.mkdir()
    shutil.copy(os.path.join(tiny["vae"], "diffusion_pytorch_model.safetensors"), vae_dir)
    shutil.copy(config, vae_dir)
    with pytest.raises(WeightFileError, match=r"missing keys: .*unexpected keys: .*decoder"):
        load_qwen_image_text_encoder(vae_dir)
    # One tensor short: the error names it.
    partial = tmp_path / "partial"
    partial.mkdir()
    state_dict = {}
    for file in resolve_safetensors_files(tiny["text_encoder"]):
        state_dict.update(load_safetensors(file))
    del state_dict["model.norm.weight"]
    save_safetensors(state_dict, partial / "model.safetensors")
    shutil.copy(config, partial)
    with pytest.raises(WeightFileError, match=r"1 missing keys: model\.language_model\.norm\.weight"):
        load_qwen_image_text_encoder(partial)
    # No config.json beside the weights; a pickle; a missing shard.
    os.remove(partial / "config.json")
    with pytest.raises(WeightFileError, match=r"config\.json: text encoder config not found"):
        load_qwen_image_text_encoder(partial / "model.safetensors")
    (tmp_path / "model.bin").write_bytes(b"not weights")
    with pytest.raises(WeightFileError, match="unsupported weight file"):
        load_qwen_image_text_encoder(tmp_path / "model.bin")
    broken = tmp_path / "broken"
    shutil.copytree(tiny["text_encoder"], broken)
    os.remove(broken / "model-00002-of-00003.safetensors")
    with pytest.raises(WeightFileError, match="shards are missing: .*model-00002-of-00003"):
        load_qwen_image_text_encoder(broken)
    # A config of another model type.
    other = tmp_path / "other"
    shutil.copytree(tiny["text_encoder"], other)
    with open(other / "config.json", "w") as f:
        json.dump({"model_type": "qwen2"}, f)
    with pytest.raises(WeightFileError, match="expected 'qwen2_5_vl'"):
        load_qwen_image_text_encoder(other)


def test_template_misuse_is_a_clear_error(encoder):
    image = _image(64, 64, 0)
    with pytest.raises(ValueError, match="needs the edit image"):
        encoder.encode("x", template="edit")
    with pytest.raises(ValueError, match="takes no images"):
        encoder.encode("x", image, template="qwen-image")
    with pytest.raises(ValueError, match="one image per prompt"):
        encoder.encode("x", [image, image], template="edit")
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        encoder.encode(["x", "y"], [image], template="edit")
    with pytest.raises(ValueError, match="unknown prompt template"):
        encoder.encode("x", template="edit-2511")
    no_processor = QwenImageTextEncoder(encoder.text_encoder, encoder.tokenizer)
    with pytest.raises(ValueError, match="load the processor"):
        no_processor.encode("x", image)
