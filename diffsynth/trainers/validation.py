"""Validation during training: the samples (one --validation_prompt, or the rows of a --validation_prompts file),
their prompts and edit images encoded once at the start (so validation runs with the conditioning cache on and the
text encoder freed), labelled images and a grid with a header per sample."""
import math
import os
import re
import textwrap
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ..utils.image import SIZE_MULTIPLE, check_edit_size, open_image, resize_edit_image
from .conditioning import DROPOUT_PROMPT
from .dataset import DatasetError, check_utf8, inspect_file, listed_problems, parse_file_list, read_metadata

COLUMNS = ("prompt", "edit_image", "seed", "width", "height", "steps", "negative_prompt", "cfg_scale")
# musubi-tuner's sample-prompt options (a .txt line: "<prompt> --w 512 --d 42 --ci a.png") -> our column
TXT_OPTIONS = {"d": "seed", "ci": "edit_image", "w": "width", "h": "height", "s": "steps", "n": "negative_prompt",
               "l": "cfg_scale"}
# musubi-tuner options with no counterpart here, and why
TXT_REFUSED = {"g": "an embedded guidance scale does not exist in Qwen-Image; musubi-tuner's "
                    "qwen_image_generate_image.py --from_file reads --g as the CFG scale: write --l for that",
               "fs": "the flow shift follows the scheduler's resolution-dependent shift",
               "f": "a frame count is for video models", "i": "an I2V start image is for video models",
               "ei": "an end image is for video models", "cn": "a control video is for video models",
               "of": "one-frame inference is for video models"}


class ValidationPromptsError(ValueError):
    """A --validation_prompts file that cannot be used; the message names the file, row and column of each problem."""


@dataclass(frozen=True)
class ValidationSample:
    prompt: str
    edit_images: tuple[str, ...] = ()  # resolved paths
    # seed, steps, negative_prompt, cfg_scale: None where the row leaves them out; validation_samples() fills them
    # in from the run's flags, so what runs, what --dry_run lists and each grid's header are one and the same
    seed: int | None = None  # None: the run's --seed
    width: int | None = None  # None (both): the last edit image's size
    height: int | None = None
    steps: int | None = None  # None: --validation_inference_steps
    folder: str | None = None  # under validation/: None for --validation_prompt (the flat layout), "k" for row k
    where: str = "--validation_prompt"  # how the user finds it: "row 2 (line 3)" of the file
    negative_prompt: str | None = None  # None: --validation_negative_prompt
    cfg_scale: float | None = None  # None: --validation_cfg_scale


def _integer(value):
    """An int from a JSON number or a CSV/.txt text of digits, else None (a bool, a fraction, other text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _txt_rows(path, flag) -> list[tuple[str, dict]]:
    """musubi-tuner's sample-prompt file as rows: a prompt per line, options split off at " --" as musubi-tuner
    splits them; "#" lines are comments. A refused or unknown option raises, naming its line."""
    check_utf8(path)
    rows, problems = [], []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            prompt, *options = line.split(" --")
            row, where = {"prompt": prompt.strip()}, f"line {line_no}"
            for option in options:
                name, _, value = option.strip().partition(" ")
                column = TXT_OPTIONS.get(name.lower())
                if column and not value.strip():  # dropped as an empty cell, it would silently do nothing
                    problems.append(f"  {where}: --{name} without a value; give its {column.replace('_', ' ')} "
                                    f"(--{name} <value>), or leave it out")
                elif column == "edit_image":  # --ci repeats, one image each
                    row.setdefault("edit_image", []).append(value.strip())
                elif column:
                    row[column] = value.strip()
                else:
                    why = TXT_REFUSED.get(name.lower(), "not a musubi-tuner option")
                    problems.append(f"  {where}: --{name} is not supported here ({why}); the options are "
                                    + ", ".join(f"--{o} ({c})" for o, c in TXT_OPTIONS.items()))
            rows.append((where, row))
    if problems:
        raise ValidationPromptsError(f"{flag} {path}:\n" + listed_problems(problems))
    return rows


def read_validation_prompts(path, edit_image_area, flag="--validation_prompts") -> list[ValidationSample]:
    """Every sample of a --validation_prompts file, each row and image checked as training checks its data (before
    any model loads); one ValidationPromptsError lists every problem with its row and column. `flag` names the file
    in messages: the inference script reads the same files as --prompts."""
    if os.path.isdir(path):
        raise ValidationPromptsError(f"{flag} {path} is a folder; name the prompts file in it (.json, "
                                     ".jsonl, .csv or .txt)")
    if not os.path.isfile(path):
        raise ValidationPromptsError(f"{flag} {path}: file not found")
    base = os.path.dirname(os.path.abspath(path))  # relative paths: next to the file, wherever the run starts
    txt = path.lower().endswith(".txt")
    try:
        rows = _txt_rows(path, flag) if txt else read_metadata(path)
    except DatasetError as e:  # the dataset's reader: its text names the file already
        text = (str(e).replace("metadata file", "file").replace("image,edit_image,prompt", "prompt,edit_image")
                .replace("use .csv, .json or .jsonl", "use .json, .jsonl, .csv or .txt"))
        raise ValidationPromptsError(f"{flag} {text}") from None
    if not rows:
        raise ValidationPromptsError(f"{flag} {path}: the file holds no prompt")
    names = {c: f"--{o}" for o, c in TXT_OPTIONS.items()} if txt else {c: c for c in COLUMNS}
    problems, samples, unknown = [], [], set()
    for k, (where, row) in enumerate(rows, 1):
        if not isinstance(row, dict):
            problems.append(f"  {where}: expected an object with {', '.join(COLUMNS)}, got {type(row).__name__}")
            continue
        for column in sorted(row.keys() - set(COLUMNS) - unknown):  # named once, at its first row
            unknown.add(column)
            problems.append(f"  {where}: unknown column {column!r}; the columns are {', '.join(COLUMNS)}")
        # an empty CSV cell is no value: columns are shared by every row
        row = {c: v for c, v in row.items() if c in COLUMNS and v is not None and str(v).strip() != ""}
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"  {where}: no prompt (a text that is not empty); add one")
        values = {}
        for column in ("seed", "width", "height", "steps"):
            if column not in row:
                continue
            value = _integer(row[column])
            low = {"seed": 0, "steps": 1}.get(column, SIZE_MULTIPLE)
            if value is None or value < low or value >= 2**63 or (column in ("width", "height")
                                                                 and value % SIZE_MULTIPLE):
                rule = (f"a multiple of {SIZE_MULTIPLE}, at least {SIZE_MULTIPLE}" if column in ("width", "height")
                        else f"a whole number >= {low}")
                problems.append(f"  {where}: {names[column]} {row[column]!r} must be {rule}")
            else:
                values[column] = value
        if "cfg_scale" in row:
            try:
                scale = None if isinstance(row["cfg_scale"], bool) else float(row["cfg_scale"])
            except (TypeError, ValueError):
                scale = None
            if scale is None or not math.isfinite(scale) or scale < 1:
                problems.append(f"  {where}: {names['cfg_scale']} {row['cfg_scale']!r} must be a number >= 1 (1: no "
                                "CFG)")
            else:
                values["cfg_scale"] = scale
        negative = row.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            problems.append(f"  {where}: {names['negative_prompt']} {negative!r} must be a text")
            negative = None
        if ("width" in row) != ("height" in row):
            problems.append(f"  {where}: {names['width']} and {names['height']} go together (or neither: the size "
                            "follows the last edit image)")
        try:
            rels = parse_file_list(row.get("edit_image"))
        except ValueError as e:
            problems.append(f"  {where}: {names['edit_image']} {row['edit_image']!r} is not a JSON list of paths ({e})")
            rels = []
        files = []
        for rel in rels:
            if not rel:
                problems.append(f"  {where}: an empty path in {names['edit_image']}; name a file")
                continue
            path_ = os.path.abspath(os.path.join(base, os.path.expanduser(rel)))  # an absolute path stays as is
            found = inspect_file(path_)  # what the training data check says of such a file, or its size
            if isinstance(found, str):
                found = found if os.path.exists(path_) else f"file not found (looked at {path_})"
                problems.append(f"  {where}: {names['edit_image']} {rel} {found}")
                continue
            try:
                check_edit_size(f"{names['edit_image']} {rel}", found[1], edit_image_area)
            except ValueError as e:
                problems.append(f"  {where}: {e}")
                continue
            files.append(path_)
        samples.append(ValidationSample(str(prompt or "").strip(), tuple(files), values.get("seed"),
                                        values.get("width"), values.get("height"), values.get("steps"), str(k),
                                        where, negative, values.get("cfg_scale")))
    if problems:
        raise ValidationPromptsError(f"{flag} {path}: {len(problems)} problem(s):\n" + listed_problems(problems))
    return samples


def validation_samples(args) -> list[ValidationSample]:
    """This run's validation samples (none without a prompt), every file checked: --validation_prompt with its
    --validation_edit_image, or the rows of --validation_prompts; what a row leaves out is the run's flags' value."""
    if args.validation_prompts:
        samples = read_validation_prompts(args.validation_prompts, args.edit_image_area)
    elif args.validation_prompt:
        for path in args.validation_edit_image or []:
            check_edit_size(f"--validation_edit_image {path}", open_image(path).size, args.edit_image_area)
        samples = [ValidationSample(args.validation_prompt, tuple(args.validation_edit_image or ()))]
    else:
        return []
    return with_defaults(samples, seed=args.seed, steps=args.validation_inference_steps,
                         cfg_scale=args.validation_cfg_scale,
                         # the inference script's default negative prompt
                         negative_prompt=DROPOUT_PROMPT if args.validation_negative_prompt is None
                         else args.validation_negative_prompt)


def with_defaults(samples, **flags) -> list[ValidationSample]:
    """The samples with each field a row leaves out (None, or no edit image) set to `flags`' value for it."""
    return [replace(s, **{k: v for k, v in flags.items() if getattr(s, k) is None or getattr(s, k) == ()})
            for s in samples]


def describe_samples(samples, args) -> list[str]:
    """--dry_run's list of the validation samples: where each is written, with its prompt, images, seed and size."""
    if not samples:
        return []
    when = ("before the first step, " if getattr(args, "validation_at_start", False) else "") + (
        f"every {args.validation_steps} steps and " if args.validation_steps else "")
    lines = [f"validation: {len(samples)} sample(s), {when}at the end:"]
    for s in samples:
        size = f"{s.width}x{s.height}" if s.width else "the last edit image's size" if s.edit_images else "square"
        lines.append(f"  validation/{s.folder + '/' if s.folder else ''} ({s.where}): {s.prompt!r}; "
                     f"{len(s.edit_images)} edit image(s){': ' if s.edit_images else ''}{', '.join(s.edit_images)}; "
                     f"seed {s.seed}, {s.steps} steps, {size}, "
                     + (f"true CFG {s.cfg_scale:g}" if s.cfg_scale > 1 else "no CFG"))
    return lines


class ValidationInputs:
    """Each sample's prompt embedding and edit images' latents, computed once (outside autocast, like the training
    conditioning); the pipeline then needs only the DiT and the VAE decoder."""

    @torch.no_grad()
    def __init__(self, pipe, samples, edit_image_area):
        self.samples, self.edit_images, self.prompt_embeds, self.edit_latents = list(samples), [], [], []
        self.negative_embeds = []
        for sample in self.samples:
            images = [open_image(p) for p in sample.edit_images]
            self.edit_images.append(images)
            self.prompt_embeds.append(pipe.encode_prompt([sample.prompt], [images] if images else None))
            resized = [resize_edit_image(img, edit_image_area) for img in images]
            self.edit_latents.append(pipe.encode_edit_images(resized) if resized else None)
            # true CFG as the inference script runs it (its negative prompt sees the edit images too)
            self.negative_embeds.append(pipe.encode_prompt([sample.negative_prompt], [images] if images else None)
                                        if sample.cfg_scale > 1 else None)

    def generate(self, pipe, k, edit_image_area):
        """Sample k's image, with its seed, steps and CFG (validation_samples() resolved them)."""
        s = self.samples[k]
        cfg = s.cfg_scale > 1
        return pipe(s.prompt, edit_image=self.edit_images[k] or None, height=s.height, width=s.width,
                    seed=s.seed, num_inference_steps=s.steps, edit_image_area=edit_image_area, progress=False,
                    prompt_embeds=self.prompt_embeds[k], edit_latents=self.edit_latents[k],
                    negative_prompt=s.negative_prompt if cfg else None, cfg_scale=s.cfg_scale,
                    negative_prompt_embeds=self.negative_embeds[k])


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
