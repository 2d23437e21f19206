"""The Qwen-Image text encoder: transformers' Qwen2.5-VL, loaded from either key layout, and prompt encoding that
reproduces diffusers' Qwen-Image pipelines token for token.

Key layouts: the official checkpoint (`Qwen/Qwen-Image:text_encoder/model-*.safetensors`) predates transformers'
renaming and stores `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`, `lm_head.*`; current
transformers names the same tensors `model.language_model.*` and `model.visual.*`. Both load here.

Prompt templates (the strings are diffusers', so embeddings match its pipelines):
- "qwen-image": text-to-image chat template, the first 34 tokens (the system prompt) are dropped;
- "edit": Qwen-Image-Edit, one image shown to the VL model inside the user turn, 64 tokens dropped;
- "edit-plus": Qwen-Image-Edit-2509/2511, "Picture i: <image>" per image, 64 tokens dropped.

The processor is used as its two parts (tokenizer + image processor): transformers' Qwen2.5-VL processor class
cannot be built without torchvision (its video processor needs it) although images alone do not.
"""
import os
import re

import torch
from accelerate import init_empty_weights
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diffsynth.utils.image import VL_TEMPLATE_AREAS, edit_image_size
from diffsynth.utils.io import (
    WeightFileError, check_state_dict, config_beside, load_safetensors, loading, resolve_safetensors_files,
)

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_IMAGE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"

# template name -> (format string, tokens of system prompt to drop, area of each image as the VL model sees it)
TEMPLATES = {
    "qwen-image": (T2I_TEMPLATE, 34, None),
    "edit": (EDIT_TEMPLATE, 64, VL_TEMPLATE_AREAS["edit"]),
    "edit-plus": (EDIT_PLUS_TEMPLATE, 64, VL_TEMPLATE_AREAS["edit-plus"]),
}
MAX_TEXT_TOKENS = 1024  # diffusers' tokenizer_max_length for the text-to-image template


def to_current_layout(key: str) -> str:
    """Official (older) Qwen2.5-VL key -> the name in transformers' current module tree; current keys pass."""
    if key.startswith("visual."):
        return "model." + key
    return re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", key)


def to_official_layout(key: str) -> str:
    """Inverse of to_current_layout: the names the official checkpoint files use."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    return re.sub(r"^model\.language_model\.", "model.", key)


def load_qwen_image_text_encoder(paths, torch_dtype=torch.bfloat16, device="cpu") -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from a file, list, directory or index json (either key layout) and the config.json beside it.

    Strict: missing, unexpected or mis-shaped keys are an error listing them. The model comes back in eval mode
    with gradients off (it is only ever used to encode prompts).
    """
    files = resolve_safetensors_files(paths)
    config = config_beside(files, "text encoder", "text_encoder/config.json")
    if config.get("model_type") != "qwen2_5_vl":
        raise WeightFileError(
            f"{os.path.join(os.path.dirname(files[0]), 'config.json')}: model_type is {config.get('model_type')!r}, "
            "expected 'qwen2_5_vl' "
            "(the Qwen-Image text encoder is Qwen2.5-VL)"
        )
    # Parameters on the meta device (no throwaway random init of ~8B weights); buffers such as the rotary
    # inverse frequencies stay real and float32, as transformers' own loading leaves them.
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    state_dict = {}
    for file in loading(files, "loading text encoder"):
        for key, value in load_safetensors(file, device=device).items():
            state_dict[to_current_layout(key)] = value.to(torch_dtype)
    check_state_dict(model, state_dict, ", ".join(files))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


# (width, height) at the image's aspect ratio, about `area` pixels, both multiples of 32 (diffusers'
# calculate_dimensions): the one function that sizes edit images for the VAE sizes them for the VL model too
fit_area = edit_image_size


class QwenImageTextEncoder:
    """Prompts (and edit images) -> (prompt_embeds (B, T, D), mask (B, T) long, or None when nothing is padded).

    `tokenizer`: the Qwen2 tokenizer (`Qwen/Qwen-Image:tokenizer/` or the processor folder).
    `image_processor`: the Qwen2-VL image processor from `Qwen/Qwen-Image-Edit:processor/`; needed by the Edit
    templates only.
    """

    def __init__(self, text_encoder, tokenizer, image_processor=None):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.execution_device = None  # set when offload hooks stream the weights (they sit on "meta" meanwhile)

    @classmethod
    def from_pretrained(cls, text_encoder_path, tokenizer_path, processor_path=None, torch_dtype=torch.bfloat16,
                        device="cpu"):
        """Local folders only: the tokenizer and processor folders are read, never downloaded."""
        for what, path in (("tokenizer", tokenizer_path), ("processor", processor_path)):
            if path is not None and not os.path.isdir(path):
                raise WeightFileError(f"{path}: {what} folder not found")
        text_encoder = load_qwen_image_text_encoder(text_encoder_path, torch_dtype=torch_dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        image_processor = None
        if processor_path is not None:
            image_processor = AutoImageProcessor.from_pretrained(processor_path, local_files_only=True)
        return cls(text_encoder, tokenizer, image_processor)

    def _inputs(self, prompts: list[str], per_prompt_images, template: str):
        """Token ids, attention mask and (for Edit templates) pixel values, as diffusers' pipelines build them."""
        text_template, drop, image_area = TEMPLATES[template]
        if template == "qwen-image":
            if per_prompt_images is not None:
                raise ValueError("the 'qwen-image' (text-to-image) template takes no images; use 'edit' or 'edit-plus'")
            texts = [text_template.format(p) for p in prompts]
            tokens = self.tokenizer(texts, max_length=MAX_TEXT_TOKENS + drop, padding=True, truncation=True,
                                    return_tensors="pt")
            return dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])

        if self.image_processor is None:
            raise ValueError(f"the {template!r} template shows images to the VL model: load the processor "
                             "(Qwen/Qwen-Image-Edit:processor/) as `image_processor`")
        if per_prompt_images is None:
            raise ValueError(f"the {template!r} template needs the edit image(s)")
        if not isinstance(per_prompt_images, (list, tuple)) or len(per_prompt_images) != len(prompts):
            got = len(per_prompt_images) if isinstance(per_prompt_images, (list, tuple)) else "not a list of"
            raise ValueError(f"{len(prompts)} prompts but {got} image entries: give one entry "
                             "(an image, or a list of images for 'edit-plus') per prompt")
        texts, flat = [], []
        for prompt, entry in zip(prompts, per_prompt_images):
            entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if template == "edit" and len(entry) != 1:
                raise ValueError(f"the 'edit' template takes one image per prompt, got {len(entry)}; "
                                 "use 'edit-plus' (Qwen-Image-Edit-2509/2511) for several")
            if template == "edit-plus":
                prompt = "".join(EDIT_PLUS_IMAGE.format(i + 1) for i in range(len(entry))) + prompt
            texts.append(text_template.format(prompt))
            for image in entry:
                if not isinstance(image, Image.Image):
                    raise TypeError(f"edit images must be PIL images, got {type(image).__name__}")
                # diffusers resizes with PIL's Lanczos (VaeImageProcessor.resize); same size -> unchanged copy
                flat.append(image.resize(fit_area(*image.size, image_area), Image.LANCZOS))
        vision = self.image_processor(images=flat, return_tensors="pt")
        grid = vision["image_grid_thw"]
        # Each <|image_pad|> stands for all the merged patches of its image, in order (as the VL processor does).
        counts = iter((grid.prod(-1) // self.image_processor.merge_size**2).tolist())
        texts = [re.sub(re.escape(IMAGE_TOKEN), lambda _: IMAGE_TOKEN * next(counts), t) for t in texts]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=vision["pixel_values"], image_grid_thw=grid)

    @torch.no_grad()
    def encode(self, prompt, images=None, template: str | None = None):
        """`prompt`: a string or a list. `images`: for one prompt an image (or a list for 'edit-plus'); for a
        list of prompts one such entry per prompt. `template`: 'qwen-image', 'edit' or 'edit-plus'; by default
        'qwen-image' without images and 'edit' with them.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt_images = images if images is None or not isinstance(prompt, str) else [images]
        template = template or ("qwen-image" if images is None else "edit")
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(TEMPLATES)}")
        drop = TEMPLATES[template][1]
        device = self.execution_device or next(self.text_encoder.parameters()).device
        inputs = {k: v.to(device) for k, v in self._inputs(prompts, per_prompt_images, template).items()}
        # The base model's last hidden state (after the final norm) is what diffusers takes as hidden_states[-1];
        # skipping the LM head saves a (T x 152k) logits tensor.
        hidden = self.text_encoder.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].bool()
        # Keep each sample's real tokens minus the system prompt, then right-pad to the longest.
        rows = [h[m][drop:] for h, m in zip(hidden, mask)]
        length = max(len(r) for r in rows)
        embeds = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        out_mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            embeds[i, : len(r)] = r
            out_mask[i, : len(r)] = 1
        return embeds, (None if out_mask.all() else out_mask)
