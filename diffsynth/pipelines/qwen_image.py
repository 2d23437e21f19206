"""Qwen-Image-Edit pipeline: files -> models -> an edited image. Works with the standard or the merged-QKV DiT."""
import contextlib

import torch
from tqdm.auto import tqdm

from ..models import load_qwen_image_dit
from ..models.qwen_image_text_encoder import QwenImageTextEncoder
from ..models.qwen_image_vae import decode_latents, encode_latents, load_qwen_image_vae, pack_latents, unpack_latents
from ..schedulers import FlowMatchScheduler
from ..utils.compile import watch_compile
from ..utils.image import (
    SIZE_MULTIPLE, VAE_EDIT_AREA, ImageError, NonFiniteOutputError, as_rgb, check_cover, check_edit_size, edit_image_size,
    pil_to_tensor, resize_and_center_crop, resize_edit_image, tensor_to_pil,
)
from ..utils.model_files import detect_model_kind, parse_model_paths, resolve_model_dir, resolve_model_files

DEFAULT_MODELS = (
    "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,"
    "Qwen/Qwen-Image:text_encoder/model*.safetensors,"
    "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPES[name]


def _model_id_of(entries: str, subdir: str):
    """The model id whose entry points into `subdir` (e.g. the text encoder's repo for its tokenizer)."""
    for entry in entries.split(","):
        model_id, _, pattern = entry.strip().partition(":")
        if pattern.startswith(subdir + "/"):
            return model_id
    return None


def locate_model_files(model_id_with_origin_paths=None, model_paths=None, models_dir=None, tokenizer_path=None,
                       processor_path=None, download=True, need=("dit", "text_encoder", "vae")) -> dict:
    """-> {"dit"|"dit_merged_qkv"|"text_encoder"|"vae": files, "tokenizer": dir, "processor": dir}.

    Each file set is recognised by its keys; the tokenizer and processor default to the `tokenizer/` folder of
    the text encoder's repo and the `processor/` folder of the DiT's repo.
    """
    sets = []
    if model_paths:
        sets += [p if isinstance(p, list) else [p] for p in (parse_model_paths(model_paths)
                                                             if isinstance(model_paths, str) else model_paths)]
    entries = model_id_with_origin_paths or (None if model_paths else DEFAULT_MODELS)
    if entries:
        sets += resolve_model_files(entries, models_dir, download=download)
    found = {}
    for files in sets:
        kind = detect_model_kind(files)
        if kind in found or (kind.startswith("dit") and any(k.startswith("dit") for k in found)):
            raise ValueError(f"two {kind} file sets given: {found.get(kind)} and {files}; pass each model once")
        found[kind] = files
    dit_kind = next((k for k in found if k.startswith("dit")), None)
    missing = [n for n in need if (n == "dit" and dit_kind is None) or (n != "dit" and n not in found)]
    if missing:
        raise ValueError(f"no {' / '.join(missing)} among the model files given ({[f for s in sets for f in s]}); "
                         "add them to --model_id_with_origin_paths or --model_paths")
    if "text_encoder" in need:
        text_repo = (entries and _model_id_of(entries, "text_encoder")) or "Qwen/Qwen-Image"
        dit_repo = (entries and _model_id_of(entries, "transformer")) or "Qwen/Qwen-Image-Edit"
        found["tokenizer"] = tokenizer_path or resolve_model_dir(f"{text_repo}:tokenizer/", models_dir, download)
        found["processor"] = processor_path or resolve_model_dir(f"{dit_repo}:processor/", models_dir, download)
    return found


def host_memory_note(device, **flags) -> str | None:
    """A line for flags that keep weights in host memory for a GPU (e.g. offload=..., blocks_to_swap=...,
    use_gradient_checkpointing_offload=...) when `device` is the CPU, where they change nothing; None otherwise."""
    given = [f"--{name}" for name, value in flags.items() if value]
    if not given or torch.device(device).type != "cpu":
        return None
    return (f"note: {' and '.join(given)} {'keeps' if len(given) == 1 else 'keep'} data in host memory for a GPU; on "
            "the CPU everything is in host memory already, so this run is the same without "
            f"{'it' if len(given) == 1 else 'them'}")


OFFLOAD_MODES = {False: None, None: None, True: "model", "model": "model", "sequential": "sequential"}


def _read(what, img):
    """as_rgb, as the scripts and training read the image's file; its refusal (a damaged colour profile, a size
    the decode does not keep) names the argument, as the scripts name the file."""
    try:
        return as_rgb(img)
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None


class QwenImagePipeline:
    def __init__(self, dit, text_encoder=None, vae=None, scheduler=None, device="cpu", torch_dtype=torch.float32,
                 offload=False, edit_plus=None):
        """`offload`: False keeps every component on `device`. True / "model": idle components wait in host
        memory and each visits `device` only while it runs. "sequential": as "model", and the text encoder
        (7B, about 16.6 GB in bf16) never moves as a whole: its weights stream to `device` module by module
        (accelerate's cpu_offload), so that it runs on a GPU smaller than itself."""
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={offload!r}: use False, True / 'model' or 'sequential'")
        self.dit, self.text_encoder, self.vae = dit, text_encoder, vae
        self.edit_plus = edit_plus  # prompt template choice, see encode_prompt
        self.scheduler = scheduler or FlowMatchScheduler()
        self.device, self.torch_dtype = torch.device(device), torch_dtype
        self.offload = OFFLOAD_MODES[offload]
        if self.offload == "sequential" and text_encoder is not None:
            from accelerate import cpu_offload

            cpu_offload(text_encoder.text_encoder.to("cpu"), execution_device=self.device)
            text_encoder.execution_device = self.device

    @classmethod
    def from_pretrained(cls, model_id_with_origin_paths=None, model_paths=None, models_dir=None, tokenizer_path=None,
                        processor_path=None, merged_qkv=True, device="cpu", torch_dtype=torch.float32, download=True,
                        need=("dit", "text_encoder", "vae"), offload=False, edit_plus=None, blocks_to_swap=0,
                        dit_device=None):
        """Locate (downloading what is missing) and load every component; `offload`: see `__init__`.
        `edit_plus`: see `encode_prompt`. `blocks_to_swap`: see `enable_block_swap`; the DiT then loads into host
        memory and never is on the device whole. `dit_device`: where the DiT's weights load (default: `device`,
        or host memory with offload or block swap)."""
        files = locate_model_files(model_id_with_origin_paths, model_paths, models_dir, tokenizer_path,
                                   processor_path, download, need)
        load_device = "cpu" if offload else device
        dit_files = files.get("dit") or files.get("dit_merged_qkv")
        dit_device = dit_device or ("cpu" if blocks_to_swap else load_device)
        dit = load_qwen_image_dit(dit_files, merged_qkv, torch_dtype, dit_device) if "dit" in need else None
        text_encoder = None
        if "text_encoder" in need:
            text_encoder = QwenImageTextEncoder.from_pretrained(files["text_encoder"], files["tokenizer"],
                                                               files["processor"], torch_dtype, load_device)
        vae = load_qwen_image_vae(files["vae"], torch_dtype, load_device) if "vae" in need else None
        pipe = cls(dit, text_encoder, vae, device=device, torch_dtype=torch_dtype, offload=offload,
                   edit_plus=edit_plus)
        if blocks_to_swap and dit is not None:
            pipe.enable_block_swap(blocks_to_swap)
        return pipe

    def enable_block_swap(self, num_blocks, prefetch=1):
        """Keep the frozen weights of the DiT's last `num_blocks` blocks in pinned host memory, each copied to the
        device ahead of its use (`diffsynth/models/block_swap.py`); the other blocks are resident (with offload,
        while the DiT runs). Fuse LoRAs before or after: the host copy is the one that counts."""
        self.dit.enable_block_swap(num_blocks, self.device, prefetch)
        if not self.offload:
            self.dit.to(self.device)

    @contextlib.contextmanager
    def _on_device(self, module):
        """With offload on, a component visits the device only while it is used (a streamed text encoder
        moves module by module by itself)."""
        streamed = self.offload == "sequential" and self.text_encoder is not None and \
            module is self.text_encoder.text_encoder
        if self.offload and module is not None and not streamed:
            module.to(self.device)
            try:
                yield
            finally:
                module.to("cpu")
        else:
            yield

    # ---- conditioning (shared with the trainer) ----------------------------------------------------------------

    def encode_prompt(self, prompts, edit_images=None):
        """prompts: list of str; edit_images: one list of PIL images per prompt, or None. The text encoder resizes
        them to the area its template shows the VL model (Edit: 1024x1024, Edit-2509/2511: 384x384 each).
        -> (embeddings (B, T, D), mask (B, T) or None when nothing is padded).

        One edit image uses the Qwen-Image-Edit template; several use the Edit-2509/2511 ("Picture i:") one, which
        an Edit-2511 DiT (zero_cond_t) always takes, as with diffusers' Edit-Plus pipeline. An Edit-2509 DiT cannot
        be told from Qwen-Image-Edit's by its weights: `edit_plus=True` (the scripts' --edit_plus) gives it the
        Edit-Plus template with one image too (False forces the Edit template; None decides as above).
        """
        if self.text_encoder is None:
            raise ValueError("this pipeline was loaded without the text encoder; pass need=(..., 'text_encoder')")
        template = None
        if edit_images is not None:
            edit_2511 = self.dit is not None and self.dit.config.get("zero_cond_t", False)
            plus = self.edit_plus
            if plus is None:
                plus = edit_2511 or any(len(images) > 1 for images in edit_images)
            template = "edit-plus" if plus else "edit"
            if template == "edit":
                edit_images = [images[0] for images in edit_images]
        with self._on_device(self.text_encoder.text_encoder):
            emb, mask = self.text_encoder.encode(prompts, edit_images, template=template)
        return emb.to(self.device, self.torch_dtype), (None if mask is None else mask.to(self.device))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> packed latent tokens (B, H/16 * W/16, 64)."""
        with self._on_device(self.vae):
            return pack_latents(encode_latents(self.vae, images.to(self.device, self.torch_dtype)))

    def encode_edit_images(self, edit_images, batch_size=1):
        """Several PIL images (one size each) -> (packed tokens concatenated along the sequence, their shapes)."""
        tokens, shapes = [], []
        for img in edit_images:
            x = pil_to_tensor(img)[None].expand(batch_size, -1, -1, -1)
            tokens.append(self.encode_images(x))
            shapes.append((1, img.height // SIZE_MULTIPLE, img.width // SIZE_MULTIPLE))
        return torch.cat(tokens, dim=1), shapes

    def predict(self, latents, edit_tokens, shapes, sigma, emb, mask):
        """The DiT's velocity for the target tokens, with the edit-image tokens appended to the sequence."""
        x = latents if edit_tokens is None else torch.cat([latents, edit_tokens], dim=1)
        t = torch.full((latents.shape[0],), float(sigma), device=latents.device, dtype=latents.dtype)
        return self.dit(x, emb, mask, t, [shapes] * latents.shape[0])[:, : latents.shape[1]]

    # ---- LoRA --------------------------------------------------------------------------------------------------

    def load_lora(self, path, scale=1.0) -> list[str]:
        """Fuse a LoRA of any supported format (ours, diffusers, ComfyUI, kohya, DiffSynth) and either layout
        (q/k/v or merged to_qkv) into the DiT; returns the names of the changed layers."""
        from ..lora import fuse_lora
        from ..utils.fp8 import FP8Linear

        if any(isinstance(m, FP8Linear) for m in self.dit.modules()):
            raise ValueError("load_lora: the DiT's weights are already fp8; load LoRAs before enable_fp8")
        return fuse_lora(self.dit, path, scale=scale)

    # ---- speed -------------------------------------------------------------------------------------------------

    def enable_fp8(self, compute=True) -> str:
        """Store the DiT's linear weights in float8 (about half their memory) and, with `compute`, run their matmuls
        in fp8 where the device can (compute capability 8.9+; else storage only). After load_lora. -> what was done."""
        from ..utils.fp8 import enable_fp8

        self.dit.requires_grad_(False)
        swap = self.dit.block_swap
        if swap is None:
            return enable_fp8(self.dit, compute, self.device)
        # the conversion replaces the weights block swap holds in host memory: set the swap up again around it
        self.dit.disable_block_swap()
        done = enable_fp8(self.dit, compute, self.device)
        self.enable_block_swap(len(swap.swapped), swap.prefetch)
        return done

    def compile(self) -> int:
        """torch.compile each DiT block (one graph shared by the identical blocks); the first denoising step
        compiles. -> the number of blocks."""
        from ..utils.compile import compile_blocks

        return compile_blocks(self.dit)

    # ---- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, edit_image=None, negative_prompt=None, cfg_scale=4.0, num_inference_steps=30,
                 height=None, width=None, seed=None, input_image=None, denoising_strength=1.0,
                 edit_image_area=VAE_EDIT_AREA, latents=None, progress=True, output_type="pil",
                 prompt_embeds=None, edit_latents=None, negative_prompt_embeds=None):
        """Edit `edit_image` (a PIL image, or a list for Edit-2509/2511) as `prompt` says; -> a PIL image, or the
        final packed latent tokens (1, L, 64) with output_type="latent" (turn them into an image with `decode`).

        True CFG (two DiT passes per step) runs only with a `negative_prompt` (" " will do) and cfg_scale > 1.
        The output defaults to the last edit image's size (as diffusers' Edit-Plus pipeline chooses it); sides are
        rounded down to a multiple of 16.
        `edit_image_area` is the pixel area each edit image is resized to for the VAE (diffusers: 1024 x 1024).
        `latents`: the initial noise (1, 16, height/8, width/8) instead of drawing it from `seed`.
        `input_image` with `denoising_strength` < 1 starts from that image noised to the matching sigma.
        `prompt_embeds` and `negative_prompt_embeds` ((emb, mask) of `encode_prompt`) and `edit_latents` ((tokens,
        shapes) of `encode_edit_images` on the resized edit images) reuse conditioning computed earlier: the text
        encoder and the VAE encoder are then not needed (the trainer's validation encodes once and frees the text
        encoder). True CFG still needs a `negative_prompt` (its text, for the check above) with its embedding.
        """
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        originals = [] if edit_image is None else (list(edit_image) if isinstance(edit_image, (list, tuple))
                                                   else [edit_image])
        originals = [_read(f"edit image {i + 1}", img) for i, img in enumerate(originals)]
        for i, img in enumerate(originals):  # as the scripts check files: by name, not PIL's or the processor's error
            check_edit_size(f"edit image {i + 1}", img.size, edit_image_area)
        edit_images = [resize_edit_image(img, edit_image_area) for img in originals]
        if height is None or width is None:
            if edit_images:
                w, h = edit_images[-1].size
            else:
                w, h = edit_image_size(1, 1, edit_image_area)
            width, height = width or w, height or h
        width, height = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
        if width == 0 or height == 0:
            raise ValueError(f"output size must be at least {SIZE_MULTIPLE}x{SIZE_MULTIPLE}")
        if input_image is not None and denoising_strength < 1:  # its pixels are cut to width x height: checked first
            input_image = _read("input_image", input_image)
            check_cover("input_image", input_image.size, width, height,
                        fix=f"crop it closer to {width}:{height}, or leave height and width out")
        shape = (1, 16, height // 8, width // 8)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit a {width}x{height} output; "
                             f"expected {shape}")

        # The VL model gets the original images and resizes them itself, as diffusers does: a small
        # edit_image_area shrinks only what the VAE sees.
        if prompt_embeds is not None:
            emb, mask = prompt_embeds
        else:
            emb, mask = self.encode_prompt([prompt], [originals] if originals else None)
        use_cfg = negative_prompt is not None and cfg_scale > 1
        if use_cfg:
            neg_emb, neg_mask = (negative_prompt_embeds if negative_prompt_embeds is not None else
                                 self.encode_prompt([negative_prompt], [originals] if originals else None))
        if edit_latents is not None:
            edit_tokens, edit_shapes = edit_latents
        else:
            edit_tokens, edit_shapes = self.encode_edit_images(edit_images) if edit_images else (None, [])
        shapes = [(1, height // SIZE_MULTIPLE, width // SIZE_MULTIPLE)] + edit_shapes

        if latents is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            latents = torch.randn(shape, generator=generator)  # drawn on the CPU: same noise on any device
        noise = pack_latents(latents.to(self.device, self.torch_dtype))
        self.scheduler.set_timesteps(num_inference_steps, noise.shape[1], denoising_strength)
        if input_image is not None and denoising_strength < 1:
            init = resize_and_center_crop(input_image, width, height)  # as_rgb above
            x0 = self.encode_images(pil_to_tensor(init)[None])
            x = self.scheduler.add_noise(x0, noise, self.scheduler.sigmas[0])
        else:
            x = noise

        with self._on_device(self.dit):
            for i, sigma in enumerate(tqdm(self.scheduler.sigmas[:-1], desc="denoising", disable=not progress)):
                with watch_compile(self.dit, tqdm.write if progress else (lambda _: None), "denoising step"):
                    pred = self.predict(x, edit_tokens, shapes, sigma, emb, mask)
                    neg = self.predict(x, edit_tokens, shapes, sigma, neg_emb, neg_mask) if use_cfg else None
                if use_cfg:
                    comb = neg + cfg_scale * (pred - neg)
                    # keep each token's norm that of the conditional prediction (Qwen-Image's true CFG)
                    pred = comb * (pred.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
                x = self.scheduler.step(pred, i, x)
                if not torch.isfinite(x).all():  # never decode NaN into a black picture
                    raise NonFiniteOutputError(
                        f"the latents became NaN/inf at denoising step {i + 1} of {len(self.scheduler.sigmas) - 1} "
                        f"({self.torch_dtype}); a fused LoRA too strong for the model (lower its scale) or an "
                        "overflow in float16 (use bfloat16 or float32) are the usual causes")
        if output_type == "latent":
            return x
        return self.decode(x, height, width)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, height: int, width: int):
        """Packed latent tokens (1, height/16 * width/16, 64) -> the PIL image of height x width pixels."""
        with self._on_device(self.vae):
            image = decode_latents(self.vae, unpack_latents(tokens, height // 8, width // 8))
        return tensor_to_pil(image[0])
