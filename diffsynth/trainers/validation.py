"""Validation during training: the prompt and edit images encoded once at the start (so validation runs with the
conditioning cache on and the text encoder freed), labelled images and a grid with a header."""
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..utils.image import open_image, resize_edit_image


class ValidationInputs:
    """The validation prompt's embedding and the edit images' latents, computed once (outside autocast, like the
    training conditioning); the pipeline then needs only the DiT and the VAE decoder."""

    @torch.no_grad()
    def __init__(self, pipe, prompt, edit_image_files, edit_image_area):
        self.prompt, self.files = prompt, list(edit_image_files or [])
        self.edit_images = [open_image(p) for p in self.files]
        self.prompt_embeds = pipe.encode_prompt([prompt], [self.edit_images] if self.edit_images else None)
        resized = [resize_edit_image(img, edit_image_area) for img in self.edit_images]
        self.edit_latents = pipe.encode_edit_images(resized) if resized else None

    def generate(self, pipe, seed, num_inference_steps, edit_image_area):
        return pipe(self.prompt, edit_image=self.edit_images or None, seed=seed,
                    num_inference_steps=num_inference_steps, edit_image_area=edit_image_area, progress=False,
                    prompt_embeds=self.prompt_embeds, edit_latents=self.edit_latents)


def _font(height):
    return ImageFont.load_default(size=max(10, height))


def _text_band(width, lines, size, fill=(255, 255, 255)):
    """White band of `width` px holding `lines` of text in black."""
    font = _font(size)
    line_height = size + max(2, size // 4)
    band = Image.new("RGB", (width, line_height * len(lines) + max(4, size // 2)), fill)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((max(2, size // 4), max(2, size // 4) + i * line_height), line, fill=(0, 0, 0), font=font)
    return band


def _wrap(text, width, size):
    """Lines of `text` that fit `width` px at font size `size` (by the average glyph width)."""
    per_line = max(8, int(width / (0.55 * size)))
    return textwrap.wrap(text, per_line) or [""]


def _stack(images, width):
    out = Image.new("RGB", (width, sum(i.height for i in images)), (255, 255, 255))
    y = 0
    for img in images:
        out.paste(img, (0, y))
        y += img.height
    return out


def label_size(image):
    return max(10, min(image.width, image.height) // 20)


def labelled(image, label):
    """The image with `label` (e.g. "step 200: <prompt>") written in a band under it."""
    size = label_size(image)
    return _stack([image, _text_band(image.width, _wrap(label, image.width, size), size)], image.width)


def png_info(step_label, prompt):
    """PNG text chunks that label a saved validation image (shown by image viewers' 'properties')."""
    info = PngImagePlugin.PngInfo()
    info.add_text("step", step_label)
    info.add_text("prompt", prompt)
    return info


def grid(tiles, header, columns=8):
    """tiles: [(label, image)] -> one picture: a header band, then rows of up to `columns` tiles, each labelled.
    Tiles are resized to the last tile's size (the newest output)."""
    w, h = tiles[-1][1].size
    size = label_size(tiles[-1][1])
    cells = [labelled(img.convert("RGB").resize((w, h)), label) for label, img in tiles]
    cell_h = max(c.height for c in cells)
    cols = min(columns, len(cells))
    rows = -(-len(cells) // cols)
    width = cols * w
    head = _text_band(width, [line for part in header.split("\n") for line in _wrap(part, width, size)], size,
                      fill=(230, 230, 230))
    out = Image.new("RGB", (width, head.height + rows * cell_h), (255, 255, 255))
    out.paste(head, (0, 0))
    for i, cell in enumerate(cells):
        out.paste(cell, ((i % cols) * w, head.height + (i // cols) * cell_h))
    return out
