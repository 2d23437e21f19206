"""The Qwen-Image VAE (diffusers' AutoencoderKLQwenImage), latent normalisation and 2x2 packing.

The VAE is a causal 3D-conv autoencoder used here with one frame: images go in as (B, 3, 1, H, W) and latents
come out as (B, 16, 1, H/8, W/8). The helpers below take and return 4D tensors and add/drop that frame axis.
"""

import torch
from diffusers import AutoencoderKLQwenImage

from diffsynth.utils.io import check_state_dict, config_beside, load_safetensors, loading, resolve_safetensors_files


def load_qwen_image_vae(paths, torch_dtype=torch.float32, device="cpu") -> AutoencoderKLQwenImage:
    """Build the VAE from the config.json beside its weights and load them strictly.

    `paths`: the safetensors file (official `vae/diffusion_pytorch_model.safetensors`), a list of files, or the
    `vae/` directory. Missing, unexpected or mis-shaped keys are an error listing them.
    """
    files = resolve_safetensors_files(paths)
    config = config_beside(files, "VAE", "vae/config.json")
    # Build on the meta device (no random init of weights that are about to be replaced).
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(config)
    state_dict = {}
    for file in loading(files, "loading VAE"):
        state_dict.update(load_safetensors(file, device=device))
    check_state_dict(vae, state_dict, ", ".join(files))
    # Cast before assigning: diffusers' ModelMixin.to(dtype) warns on every call.
    state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def _latent_stats(vae, like: torch.Tensor):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8), the distribution's mode."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_latents expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    factor = vae.spatial_compression_ratio
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {factor} for the VAE")
    lo, hi = images.aminmax()
    if lo < -1.001 or hi > 1.001:  # 0..255 pixels would encode a blown-out picture silently
        raise ValueError(f"encode_latents takes images in [-1, 1], got values from {lo.item():g} to {hi.item():g}; "
                         "convert pixels with diffsynth.utils.image.pil_to_tensor (x / 127.5 - 1)")
    param = next(vae.parameters())
    x = images.to(param.device, param.dtype).unsqueeze(2)
    z = vae.encode(x).latent_dist.mode()
    mean, std = _latent_stats(vae, z)
    return ((z - mean) / std).squeeze(2)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
    if latents.ndim != 4:
        raise ValueError(f"decode_latents expects latents of shape (B, 16, h, w), got {tuple(latents.shape)}")
    param = next(vae.parameters())
    z = latents.to(param.device, param.dtype).unsqueeze(2)
    mean, std = _latent_stats(vae, z)
    return vae.decode(z * std + mean).sample.squeeze(2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, channel-major inside a token (C, dy, dx),
    the order diffusers' QwenImage pipelines use."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {(h, w)} must be even to pack 2x2 patches (image sides a multiple of 16)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents: tokens (B, h/2 * w/2, 4C) -> latents (B, C, h, w); h, w in latent pixels."""
    b, n, c4 = x.shape
    if n != (h // 2) * (w // 2) or h % 2 or w % 2:
        raise ValueError(f"{n} tokens do not unpack to a {h}x{w} latent (expected {(h // 2) * (w // 2)}, even sides)")
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)
