from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from safetensors.torch import load_file, save_file

from diffsynth.models.qwen_image_vae import (
    decode_latents, encode_latents, load_qwen_image_vae, pack_latents, unpack_latents,
)
from diffsynth.utils.io import WeightFileError

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random VAE in the official layout: vae/config.json + vae/diffusion_pytorch_model.safetensors."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    path = tmp_path_factory.mktemp("model") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_qwen_image_vae(vae_dir / "diffusion_pytorch_model.safetensors")


def test_load_is_exact_and_frozen(vae_dir, vae):
    saved = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    state = vae.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert vae.config.base_dim == 8 and not any(p.requires_grad for p in vae.parameters())
    half = load_qwen_image_vae(vae_dir, torch_dtype=torch.bfloat16)  # directory form too
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def _broken_copy(vae_dir, tmp_path, edit):
    target = tmp_path / "vae"
    target.mkdir()
    (target / "config.json").write_text((vae_dir / "config.json").read_text())
    sd = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, target / "diffusion_pytorch_model.safetensors")
    return target / "diffusion_pytorch_model.safetensors"


def test_missing_and_unexpected_keys_are_listed(vae_dir, tmp_path):
    def edit(sd):
        del sd["decoder.conv_out.weight"]
        sd["decoder.extra.weight"] = torch.zeros(1)
        sd["encoder.conv_in.bias"] = torch.zeros(3)

    path = _broken_copy(vae_dir, tmp_path, edit)
    with pytest.raises(WeightFileError) as e:
        load_qwen_image_vae(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "1 missing keys: decoder.conv_out.weight" in msg
    assert "1 unexpected keys: decoder.extra.weight" in msg
    assert "encoder.conv_in.bias (3,) != (8,)" in msg


def test_missing_config_is_an_error(vae_dir, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes((vae_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(WeightFileError, match=f"{tmp_path}/config.json: VAE config not found"):
        load_qwen_image_vae(path)


def test_encode_matches_diffusers_edit_pipeline(vae):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    ours = encode_latents(vae, images)
    # diffusers' own method, bound to a stand-in holding only the attributes it reads
    ref = QwenImageEditPipeline._encode_vae_image(
        SimpleNamespace(vae=vae, latent_channels=16), images.unsqueeze(2), generator=None
    )
    assert ours.shape == (2, 16, 4, 6)
    torch.testing.assert_close(ours, ref[:, :, 0], atol=1e-6, rtol=0)
    # normalisation really applied: undoing it gives the raw mode
    raw = vae.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1)
    torch.testing.assert_close(ours * std + mean, raw, atol=1e-5, rtol=1e-5)


def test_decode_matches_diffusers_pipeline_math(vae):
    torch.manual_seed(2)
    latents = torch.randn(2, 16, 4, 6)
    ours = decode_latents(vae, latents)
    # QwenImagePipeline.__call__: latents / (1 / std) + mean, decode, drop the frame axis
    z = latents.unsqueeze(2)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    ref = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
    assert ours.shape == (2, 3, 32, 48)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.min() >= -1 and ours.max() <= 1


def test_encode_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_latents(vae, torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encode_latents(vae, torch.zeros(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        decode_latents(vae, torch.zeros(1, 16, 1, 4, 4))


@pytest.mark.parametrize("h,w", [(4, 6), (8, 8), (2, 10)])
def test_pack_unpack_match_diffusers(h, w):
    torch.manual_seed(3)
    latents = torch.randn(2, 16, h, w)
    packed = pack_latents(latents)
    assert packed.shape == (2, h // 2 * w // 2, 64)
    torch.testing.assert_close(packed, QwenImagePipeline._pack_latents(latents, 2, 16, h, w), atol=0, rtol=0)
    unpacked = unpack_latents(packed, h, w)
    assert torch.equal(unpacked, latents)
    # diffusers unpacks from pixel sizes and keeps the frame axis
    ref = QwenImagePipeline._unpack_latents(packed, h * 8, w * 8, 8)
    assert torch.equal(unpacked, ref[:, :, 0])
    # channel-major inside a token: token 0 holds channel c's 2x2 patch at 4c .. 4c+3
    assert torch.equal(packed[0, 0, 4:8], latents[0, 1, :2, :2].flatten())


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match="do not unpack"):
        unpack_latents(torch.zeros(1, 6, 64), 4, 4)
