"""Image sizing and conversion shared by training and inference.

Edit images are sized exactly as diffusers' QwenImageEdit(Plus)Pipeline sizes them (`calculate_dimensions`:
keep the aspect ratio, hit a target area, round sides to 32, then a plain LANCZOS resize without cropping),
so a LoRA sees at training time what the pipeline feeds it at inference. Target images follow DiffSynth's
rule: a fixed --height/--width, or scaled down to at most --max_pixels, sides floored to 16, centre-cropped.
"""
import math

import numpy as np
import torch
from PIL import Image, ImageOps

# VAE 8x downsampling times the DiT's 2x2 patch: a side must be a multiple of 16 to become whole tokens.
SIZE_MULTIPLE = 16
VAE_EDIT_AREA = 1024 * 1024  # area of an edit image fed to the VAE (diffusers VAE_IMAGE_SIZE)
VL_EDIT_AREA = 384 * 384  # area of an edit image fed to the VL text encoder in Edit-Plus (CONDITION_IMAGE_SIZE)
_EXIF_ORIENTATION = 0x0112


def edit_image_size(width, height, target_area=VAE_EDIT_AREA, multiple=32) -> tuple[int, int]:
    """(w, h) of an edit image: the input's aspect ratio at about `target_area` pixels, sides rounded to 32."""
    ratio = width / height
    w = math.sqrt(target_area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


def target_size(image_size, max_pixels=1024 * 1024, height=None, width=None, multiple=SIZE_MULTIPLE):
    """(w, h) of a training target: fixed `width` x `height`, else the image scaled down to at most
    `max_pixels` area (never up), sides floored to `multiple`."""
    if (height is None) != (width is None):
        raise ValueError("--height and --width must be given together (or neither, to size by --max_pixels)")
    if height is not None:
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"--height {height} --width {width}: both must be positive multiples of {multiple} "
                f"(VAE 8x times patch 2); e.g. --height {max(multiple, height // multiple * multiple)} "
                f"--width {max(multiple, width // multiple * multiple)}"
            )
        return width, height
    w, h = image_size
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(w * h / max_pixels)
        w, h = int(w / scale), int(h / scale)
    w, h = w // multiple * multiple, h // multiple * multiple
    if w == 0 or h == 0:
        raise ValueError(
            f"image of {image_size[0]}x{image_size[1]} px gives an empty target at --max_pixels {max_pixels}: "
            f"both sides must reach {multiple} px; use a larger image or raise --max_pixels"
        )
    return w, h


def open_image(path) -> Image.Image:
    """Decode an image file as RGB, applying its EXIF rotation like diffusers' `load_image`."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) after EXIF rotation, read from the header of an opened (not decoded) image."""
    w, h = img.size
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # the rotations by 90 or 270 degrees
        w, h = h, w
    return w, h


def resize_edit_image(img: Image.Image, target_area=VAE_EDIT_AREA) -> Image.Image:
    """Resize (stretch, no crop) an edit image to `edit_image_size`, as the pipeline does."""
    w, h = edit_image_size(*img.size, target_area=target_area)
    return img.resize((w, h), resample=Image.LANCZOS)


def resize_and_center_crop(img: Image.Image, width, height) -> Image.Image:
    """Scale so the image covers width x height, then cut the centre."""
    scale = max(width / img.width, height / img.height)
    rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((rw, rh), resample=Image.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (diffusers' VaeImageProcessor arithmetic)."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] -> RGB PIL image (values clamped, rounded like diffusers)."""
    array = (tensor.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))
