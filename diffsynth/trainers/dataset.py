"""Edit-training data: metadata parsing, validation up front, sized samples, aspect-ratio buckets.

A metadata file (.csv, .json list of objects, or .jsonl) has the columns `image` (target), `edit_image`
(one input image, or several for Edit-2509: a JSON list, or `|`-separated in CSV) and `prompt`.
`validate_metadata` reads every row before any model loads and reports every problem at once; the sizes it
reads from the image headers drive the buckets, so a batch never mixes image sizes.
"""
import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffsynth.utils.image import (
    VAE_EDIT_AREA, ImageError, check_cover, check_decoded_size, check_edit_size, decode_problem, displayed_size,
    edit_image_size, file_problem, has_transparency, is_grey, open_header, open_image, pil_to_tensor, pixel_areas,
    resize_and_center_crop, resize_edit_image, srgb_transform, target_size, to_rgb,
)

DEFAULT_FILE_KEYS = "image,edit_image"
SUPPORTED_FILE_KEYS = ("image", "edit_image", "mask")  # mask: optional loss mask of the target, white = train
MAX_LISTED_PROBLEMS = 100
# Bump when the pixels a sample yields for the same files change (resampling, cropping), so caches keyed
# by `cache_key` are recomputed.
SAMPLE_FORMAT_VERSION = 4  # 2: an RGB PNG's colour key is transparency (composited over white); 3: rotated uncompressed
# non-RGB TIFFs decoded upright (not scrambled), dark 16-bit PGMs scaled as 16-bit; 4: colours converted from an
# embedded non-sRGB ICC profile to sRGB


class DatasetError(ValueError):
    """The metadata or the files it names cannot be trained on; the message lists every problem."""

    def __init__(self, message):
        # A DataLoader worker's error comes back as DatasetError("Caught ... Original Traceback ... DatasetError:
        # <message>"): keep the message, the user has a row to fix, not code to debug.
        if "Original Traceback" in message:
            message = message.rpartition(f"{__name__}.DatasetError: ")[2].rstrip("\n")
        super().__init__(message)


@dataclass(frozen=True)
class Sample:
    where: str  # "row 3 (line 4)": how the user finds it in the metadata file
    image: str  # resolved paths
    edit_images: tuple[str, ...]
    prompt: str
    target_size: tuple[int, int]  # (w, h) of the image tensor
    edit_sizes: tuple[tuple[int, int], ...]  # (w, h) of each edit tensor
    cache_key: str  # hash of file contents, prompt and sizes: what a conditioning cache depends on
    mask: str | None = None  # loss mask (white = train), sized and cropped like the target; not conditioning
    area: int | None = None  # the --max_pixels area that sized the target (one of several: multi-resolution)


def parse_file_keys(data_file_keys) -> list[str]:
    keys = [k.strip() for k in data_file_keys.split(",")] if isinstance(data_file_keys, str) else list(data_file_keys)
    keys = [k for k in keys if k]
    unknown = [k for k in keys if k not in SUPPORTED_FILE_KEYS]
    if unknown or "image" not in keys:
        raise DatasetError(
            f"--data_file_keys {','.join(keys)!r}: "
            + (f"unsupported column(s) {', '.join(unknown)}; " if unknown else "'image' (the target) is required; ")
            + f"Qwen-Image-Edit training reads {', '.join(SUPPORTED_FILE_KEYS)} (default {DEFAULT_FILE_KEYS!r})"
        )
    return keys


def check_utf8(path):
    """Metadata must be UTF-8 (with or without a BOM): name the first line that is not, and the likely encoding."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                guess = "UTF-16" if b"\x00" in line else "Latin-1 / Windows-1252 (Excel's 'CSV')"
                raise DatasetError(
                    f"{path}: line {line_no} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}; "
                    f"the file looks {guess}-encoded). Save it as UTF-8 (in Excel: 'CSV UTF-8'; or "
                    f"`iconv -f latin1 -t utf-8`)") from None


def listed_problems(problems) -> str:
    """The problems a line each, the first MAX_LISTED_PROBLEMS of them, then how many more."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    return "\n".join(shown) + (f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else "")


def _field_count_hint(fields, header):
    """Why a CSV row has more or fewer fields than the header, as far as its cells tell."""
    if len(fields) < len(header):
        return "a value is missing"
    if not any(f.strip() for f in fields[len(header):]):
        return "a trailing comma"
    images = [f for f in fields if os.path.splitext(f.strip())[1].lower() in Image.registered_extensions()]
    if len(images) > len([c for c in header if c in SUPPORTED_FILE_KEYS]):
        return "edit images separated by ',' instead of '|'?"
    return "a comma in an unquoted value?"


def _read_csv(path) -> list[tuple[str, dict]]:
    """Rows of a CSV file with a header line, all values as text (a prompt "1" stays "1"). Every row with more
    or fewer fields than the header is an error: pandas would silently shift such a row (an extra field makes
    the first column its index), training on the wrong files."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.readlines()
    reader, records, start = csv.reader(lines, strict=True), [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):  # blank lines and Excel's empty ",," rows hold no sample
                records.append((start, reader.line_num, fields))
            start = reader.line_num + 1  # a quoted cell may span lines: a record starts after the previous one
    except csv.Error as e:
        raise DatasetError(f"{path}: line {reader.line_num} is not readable as CSV ({e}); a value in double quotes "
                           'ends with a double quote, and a quote inside it is written twice ("")') from None
    if not records:
        raise DatasetError(f"{path}: the metadata is empty; expected a header line image,edit_image,prompt")
    header_line, header = records[0][0], [c.strip() for c in records[0][2]]  # "image, edit_image": spaces don't count
    if "" in header or len(set(header)) < len(header):
        what = "a column without a name (a trailing comma?)" if "" in header else "a column name twice"
        raise DatasetError(f"{path}: the header (line {header_line}) {','.join(header)!r} has {what}; "
                           "expected e.g. image,edit_image,prompt")
    rows, bad = [], []
    for i, (line_no, end, fields) in enumerate(records[1:], 1):
        where = f"row {i} (line {line_no})"
        if len(fields) == len(header):
            rows.append((where, dict(zip(header, fields))))
        else:
            text = "".join(lines[line_no - 1:end]).strip()
            bad.append(f"  {where}: {len(fields)} fields, the header has {len(header)} "
                       f"({_field_count_hint(fields, header)}): {text[:200]}")
    if bad:
        raise DatasetError(
            f"{path}: {len(bad)} row(s) do not have one field per header column ({','.join(header)}):\n"
            + listed_problems(bad) + "\nSeveral edit images go in one cell separated by '|' (edits/a.png|edits/b.png); a value holding a "
            'comma must be in double quotes ("make it red, then blue"); a row has no comma after its last value.')
    return rows


def read_metadata(path) -> list[tuple[str, dict]]:
    """Rows of a metadata file as (where, row dict); a file that cannot be parsed raises DatasetError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: metadata file not found (--dataset_metadata_path)")
    ext = os.path.splitext(path)[1].lower()
    check_utf8(path)
    if ext == ".csv":
        rows = _read_csv(path)
    elif ext == ".json":
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e})")
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json metadata file must hold a list of objects, one per sample")
        rows = [(f"row {i + 1}", row) for i, row in enumerate(data)]
    elif ext == ".jsonl":
        rows, bad = [], []
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"row {len(rows) + 1} (line {line_no})", json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append(f"  line {line_no}: not valid JSON ({e})")
        if bad:
            raise DatasetError(f"{path}: {len(bad)} line(s) are not valid JSON:\n" + "\n".join(bad))
    else:
        raise DatasetError(f"{path}: unsupported metadata format {ext!r}; use .csv, .json or .jsonl")
    if not rows:
        raise DatasetError(f"{path}: the metadata holds no rows")
    return rows


def parse_file_list(value) -> list[str]:
    """A cell naming files: a list, a JSON list string, or paths separated by `|`."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    text = "" if value is None else str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        parsed = json.loads(text)  # a JSONDecodeError is reported with the row by the caller
        if not isinstance(parsed, list):
            raise ValueError("not a JSON list")
        return [str(v).strip() for v in parsed]
    return [p.strip() for p in text.split("|")]


def inspect_file(path):
    """(sha256, displayed (w, h), what makes its ICC profile unusable or None) of an image file, or an error text.
    Reads the bytes once. The profile is reported apart: a mask, read by its grey level, does not use it."""
    problem = file_problem(path)
    if problem:
        return f"{problem}; re-export or replace it"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return decode_problem(path, e)
    try:
        with open_header(io.BytesIO(data)) as img:
            img.verify()  # checks structure and checksums without decoding pixels; must come first
        with open_header(io.BytesIO(data)) as img:
            size = displayed_size(img)
            try:
                srgb_transform(img)
                profile = None
            except ImageError as e:
                profile = str(e)
            # verify() checks a PNG's every chunk checksum, but barely looks at other formats: a cut or damaged
            # GIF, TIFF, BMP, WebP or JPEG passes it and fails only when training decodes it. Decode those now (a
            # JPEG at 1/8 scale, cheap; draft() does nothing for formats without reduced decoding).
            if img.format != "PNG" or img.mode in ("I", "F"):  # I/F: the pixel range decides whether they convert
                header = img.size
                drafted = img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                if not drafted:  # decoded at full size: it must be the header's
                    check_decoded_size(img, header)
                if img.mode in ("I", "F"):
                    to_rgb(img, icc=False)
    except ImageError as e:  # says what to do itself
        return str(e)
    except Exception as e:  # PIL raises many types for damaged files
        return decode_problem(path, e)
    return hashlib.sha256(data).hexdigest(), size, profile


def validate_metadata(metadata_path, base_path="", data_file_keys=DEFAULT_FILE_KEYS, max_pixels=1024 * 1024,
                      height=None, width=None, edit_area=VAE_EDIT_AREA) -> list[Sample]:
    """Check every row and file; return the samples, or raise one DatasetError listing every problem.

    Paths are relative to `base_path` (like DiffSynth's --dataset_base_path; "" is the working directory).
    `max_pixels`: one area, or a list of several: then every row is one sample per area, the areas one after the
    other (all rows at the first area, then at the second, as ai-toolkit concatenates one dataset per resolution).
    Warns, without failing, when a row's target and edit image have the same content.
    """
    keys = parse_file_keys(data_file_keys)
    areas = pixel_areas(max_pixels)
    base_path = os.fspath(base_path or "")
    if height is not None or width is not None:
        target_size((1, 1), max_pixels, height, width)  # bad --height/--width raise here, once
    rows = read_metadata(metadata_path)
    columns = keys + ["prompt"]
    problems, same_content, other_shape, kept, inspected = [], [], [], [], {}

    present = Counter(c for _, row in rows if isinstance(row, dict) for c in columns if c in row)
    if "mask" not in keys and any(isinstance(row, dict) and row.get("mask") for _, row in rows):
        warnings.warn(f"{metadata_path}: the metadata has a mask column, but --data_file_keys {','.join(keys)} does "
                      "not name it, so the loss is not masked; add mask to --data_file_keys to use it", stacklevel=2)
    absent = [c for c in columns if present[c] == 0]
    for c in absent:
        found = sorted({k for _, row in rows if isinstance(row, dict) for k in row})
        hint = " or remove it from --data_file_keys" if c == "edit_image" else ""
        problems.append(f"  column {c!r} is missing (found: {', '.join(found) or 'none'}); add it{hint}")

    def check_file(where, column, rel):
        path = os.path.abspath(os.path.join(base_path, os.path.expanduser(rel)))  # an absolute rel stays as is
        if not os.path.exists(path):
            problems.append(f"  {where}: {column} file not found: {rel} (looked at {path})")
            return None
        if path not in inspected:
            inspected[path] = inspect_file(path)
        problem = inspected[path]
        if not isinstance(problem, str):  # readable: its ICC profile may still be unusable, except on a mask
            problem = None if column == "mask" else problem[2]
        if problem:
            problems.append(f"  {where}: {column} {rel} {problem}")
            return None
        return path

    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"  {where}: expected an object with {', '.join(columns)}, got {type(row).__name__}")
            continue
        ok = True
        files, names = {}, {}  # column -> resolved paths, and the paths as the row names them
        for column in keys:
            if column in absent:
                ok = False
                continue
            if column == "mask" and row.get("mask") is None:
                continue  # a row without a mask trains on the whole target
            if column not in row:
                problems.append(f"  {where}: no {column!r} value; add it")
                ok = False
                continue
            try:
                rels = parse_file_list(row[column])
            except ValueError as e:
                problems.append(f"  {where}: {column} {row[column]!r} is not a JSON list of paths ({e})")
                ok = False
                continue
            if column == "mask" and not rels:
                continue  # a row without a mask trains on the whole target
            if not rels or any(not r for r in rels):
                problems.append(f"  {where}: empty path in column {column!r}; name a file")
                ok = False
                continue
            if column in ("image", "mask") and len(rels) != 1:
                problems.append(f"  {where}: {column} holds {len(rels)} paths; the target{' mask' * (column == 'mask')}"
                                " must be one image")
                ok = False
                continue
            paths = [check_file(where, column, r) for r in rels]
            ok = ok and None not in paths
            files[column] = paths
            names[column] = rels
        prompt = row.get("prompt")
        if "prompt" not in absent:
            if not isinstance(prompt, str) and prompt is not None:
                problems.append(f"  {where}: prompt must be text, got {type(prompt).__name__} {prompt!r}")
                ok = False
            elif not prompt or not prompt.strip():
                problems.append(f"  {where}: empty prompt; write the edit instruction")
                ok = False
        if not ok:
            continue

        image, edits = files["image"][0], tuple(files.get("edit_image", []))
        image_digest, image_wh = inspected[image][:2]
        try:
            # never scaled up: a target smaller than an area keeps its own size there (as ai-toolkit's buckets take
            # the smaller of the resolution and the image's own), a copy like a smaller area's
            sizes = [target_size(image_wh, area, height, width) for area in areas]
            size = sizes[0]  # the fixed size, with --height/--width
            if height is not None:  # a fixed size: the target is scaled to cover it, its centre cut
                check_cover(f"image {row['image']}", image_wh, *size,
                            fix=f"crop it closer to {size[0]}:{size[1]}, or leave out --height/--width to size each "
                                "target by --max_pixels at its own aspect ratio")
        except ImageError as e:
            problems.append(f"  {where}: {e}")
            continue
        except ValueError as e:
            problems.append(f"  {where}: image {row['image']}: {e}")
            continue
        mask = (files.get("mask") or [None])[0]
        if mask is not None:
            (mw, mh), (iw, ih) = inspected[mask][1], image_wh
            if abs(mw * ih - mh * iw) > max(mw, mh, iw, ih):  # more than a pixel of rounding apart
                problems.append(f"  {where}: mask {row['mask']} is {mw}x{mh}, the image {iw}x{ih}: a mask is resized "
                                "and cropped like its target, so it needs the target's aspect ratio (best: its size)")
                continue
            with open_header(mask) as m:  # readable: inspected above
                transparent, grey = has_transparency(m), is_grey(m)
            if transparent:  # composited over white it would read 'train' wherever it is transparent
                problems.append(f"  {where}: mask {row['mask']} has transparent pixels: a mask is read by its grey "
                                "level (white = train, black = ignore), not its alpha; flatten it onto black and save "
                                "it without transparency")
                continue
            if not grey:  # red paint would weigh 0.3 (its luma), silently
                problems.append(f"  {where}: mask {row['mask']} is coloured: a mask is read by its grey level (white "
                                "= train, black = ignore, grey in between); save it as a greyscale image")
                continue
        try:  # an edit image the VAE or the VL text encoder cannot take: refused here, not mid-run
            for p, rel in zip(edits, names.get("edit_image", [])):
                check_edit_size(f"edit_image {rel}", inspected[p][1], edit_area)
        except ImageError as e:
            problems.append(f"  {where}: {e}")
            continue
        edit_sizes = tuple(edit_image_size(*inspected[p][1], target_area=edit_area) for p in edits)
        edit_digests = [inspected[p][0] for p in edits]
        if image_digest in edit_digests:
            same_content.append(f"  {where}: {row['image']}")
        (ew, eh) = inspected[edits[-1]][1] if edits else (1, 1)
        size = max(sizes, key=lambda s: abs(math.log(s[0] * eh / (s[1] * ew))))  # the area floored furthest from it
        if edits and abs(math.log(size[0] * eh / (size[1] * ew))) > math.log(1.1):  # trained vs inferred shape
            other_shape.append(f"  {where}: {row['image']} is {image_wh[0]}x{image_wh[1]}"
                               f"{f' (trained at {size[0]}x{size[1]})' if size != tuple(image_wh) else ''}, "
                               f"{names['edit_image'][-1]} {ew}x{eh}")
        kept.append((where, image, edits, prompt, sizes, edit_sizes, image_digest, edit_digests, mask))

    samples = []
    for k, area in enumerate(areas):
        for where, image, edits, prompt, sizes, edit_sizes, image_digest, edit_digests, mask in kept:
            key = json.dumps([SAMPLE_FORMAT_VERSION, image_digest, edit_digests, prompt, sizes[k], edit_sizes])
            samples.append(Sample(where, image, edits, prompt, sizes[k], edit_sizes,
                                  hashlib.sha256(key.encode()).hexdigest(), mask, area))
    if problems:
        raise DatasetError(
            f"{metadata_path}: {len(problems)} problem(s) in the training data:\n" + listed_problems(problems)
            + f"\nFix the listed rows or files (file paths are relative to --dataset_base_path "
            f"{os.path.abspath(base_path)!r}), or remove those rows, then rerun."
        )
    if same_content:
        warnings.warn(
            f"{metadata_path}: {len(same_content)} row(s) use the same image as target and edit input, so the "
            "model learns no edit there; check that the image and edit_image columns are not swapped or "
            "duplicated:\n" + "\n".join(same_content[:MAX_LISTED_PROBLEMS]),
            stacklevel=2,
        )
    if other_shape:
        warnings.warn(
            f"{metadata_path}: {len(other_shape)} row(s) have a target whose aspect ratio differs from their last edit "
            "image's (by over 10%). Inference, and validation during training, output the last edit image's aspect "
            "ratio unless --height and --width are given: pass the target shape there when you use this LoRA, or "
            "crop targets and edit images alike:\n" + "\n".join(other_shape[:MAX_LISTED_PROBLEMS]),
            stacklevel=2,
        )
    return samples


class EditDataset(torch.utils.data.Dataset):
    """Validated edit samples, repeated `dataset_repeat` times; items are ready-sized tensors in [-1, 1]."""

    def __init__(self, metadata_path, base_path="", data_file_keys=DEFAULT_FILE_KEYS, max_pixels=1024 * 1024,
                 height=None, width=None, edit_area=VAE_EDIT_AREA, dataset_repeat=1):
        if not isinstance(dataset_repeat, int) or dataset_repeat < 1:
            raise DatasetError(f"--dataset_repeat {dataset_repeat!r}: must be a whole number >= 1")
        self.samples = validate_metadata(metadata_path, base_path, data_file_keys, max_pixels, height, width, edit_area)
        self.edit_area = edit_area
        self.repeat = dataset_repeat

    def __len__(self):
        return len(self.samples) * self.repeat

    def sample(self, index) -> Sample:
        return self.samples[index % len(self.samples)]

    def bucket_key(self, index):
        """What must be equal within a batch: the target size and every edit size, from the headers only."""
        s = self.sample(index)
        return s.target_size, s.edit_sizes

    def __getitem__(self, index):
        s = self.sample(index)
        try:  # a file that broke after validation (or that only a full decode shows): name the row, as validation does
            image = resize_and_center_crop(open_image(s.image), *s.target_size)
            edits = [resize_edit_image(open_image(p), self.edit_area) for p in s.edit_images]
            mask = None
            if s.mask is not None:  # white = 1 (train), black = 0, grey in between
                mask = resize_and_center_crop(open_image(s.mask, icc=False).convert("L"), *s.target_size)
                mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        except ImageError as e:
            raise DatasetError(f"  {s.where}: {e} (or remove the row)") from None
        return {
            "image": pil_to_tensor(image),
            "mask": mask,
            "edit_images": [pil_to_tensor(e) for e in edits],
            "prompt": s.prompt,
            "index": index % len(self.samples),
            "position": index,  # with the repeats: each repeat of a sample draws its own noise
            "cache_key": s.cache_key,
        }


def collate_fn(items):
    """Stack a batch: image (B,3,H,W), edit_images a list (one per edit slot) of (B,3,h,w), lists otherwise."""
    shapes = {(tuple(x["image"].shape), tuple(tuple(e.shape) for e in x["edit_images"])) for x in items}
    if len(shapes) > 1:
        raise ValueError(
            f"a batch mixes image sizes {sorted(shapes)}; batch with BucketBatchSampler so each batch is one size"
        )
    return {
        "image": torch.stack([x["image"] for x in items]),
        "edit_images": [torch.stack(slot) for slot in zip(*(x["edit_images"] for x in items))],
        "prompt": [x["prompt"] for x in items],
        "index": [x["index"] for x in items],
        "position": [x["position"] for x in items],
        "cache_key": [x["cache_key"] for x in items],
        # (B, 1, H, W) in [0, 1] when any sample has a mask (the others train everywhere), else None
        "mask": None if all(x.get("mask") is None for x in items) else torch.stack(
            [x["mask"] if x.get("mask") is not None else torch.ones_like(x["image"][:1]) for x in items]),
    }


def _format_key(key):
    (w, h), edits = key
    return f"{w}x{h}" + (" | edit " + "+".join(f"{ew}x{eh}" for ew, eh in edits) if edits else "")


def area_summary(samples) -> list[str]:
    """With several --max_pixels areas: a line per area, with its samples (one per row), their size buckets and how
    many are a copy of a smaller area's (a target smaller than the area is not scaled up). [] with one area."""
    areas = list(dict.fromkeys(s.area for s in samples))
    if len(areas) < 2:
        return []
    lines, smaller = [f"--max_pixels: {len(areas)} areas, each row trained at each (before --dataset_repeat):"], set()
    for area in sorted(areas):
        at = [s for s in samples if s.area == area]
        same = sum(s.cache_key in smaller for s in at)
        smaller |= {s.cache_key for s in at}
        lines.append(f"  {area} px (~{math.isqrt(area)}x{math.isqrt(area)}): {len(at)} samples in "
                     f"{len(Counter(s.target_size + s.edit_sizes for s in at))} size bucket(s)"
                     + (f", {same} the same as at a smaller area (targets under {area} px are not scaled up)"
                        * bool(same)))
    return lines


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices that share one target size and one set of edit sizes.

    Per epoch: the indices are shuffled with seed + epoch (torch.randperm, like a seeded RandomSampler) and
    dealt into per-size buckets; a bucket yields a batch as soon as it holds `batch_size` indices, and the
    partial leftovers follow at the end unless `drop_last`. With batch_size 1 this is exactly the shuffled
    order. Batches are dealt round-robin to `num_replicas` ranks, padded by repeating the first batches (or
    cut, with drop_last) so every rank runs the same number of steps, which DDP needs to not hang.
    `set_start(k)` skips this rank's first k batches of the epoch, for an exact resume.
    """

    def __init__(self, dataset, batch_size, shuffle=True, seed=0, drop_last=False, num_replicas=1, rank=0):
        if batch_size < 1:
            raise ValueError(f"--batch_size {batch_size}: must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.keys = [dataset.bucket_key(i) for i in range(len(dataset))]
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0
        if self.num_batches_per_rank() == 0:
            raise ValueError(
                f"no batch to train on: {len(self.keys)} samples, --batch_size {batch_size}, drop_last, "
                f"{num_replicas} process(es); lower --batch_size or raise --dataset_repeat"
            )

    def set_epoch(self, epoch):
        self.epoch, self.start = epoch, 0

    def set_start(self, num_batches):
        """Skip this rank's first `num_batches` batches of the current epoch (reset by set_epoch)."""
        if not 0 <= num_batches <= self.num_batches_per_rank():
            raise ValueError(f"cannot skip {num_batches} batches of an epoch of {self.num_batches_per_rank()}")
        self.start = num_batches

    def _total_batches(self):
        # The batch count depends on the bucket sizes only, not on the shuffled order.
        counts = Counter(self.keys).values()
        return sum(c // self.batch_size + (0 if self.drop_last or c % self.batch_size == 0 else 1) for c in counts)

    def num_batches_per_rank(self):
        total, n = self._total_batches(), self.num_replicas
        return total // n if self.drop_last else -(-total // n)

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, before the resume skip."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.keys), generator=generator).tolist()
        else:
            order = range(len(self.keys))
        open_buckets, batches = {}, []
        for i in order:
            bucket = open_buckets.setdefault(self.keys[i], [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(open_buckets.pop(self.keys[i]))
        if not self.drop_last:
            batches += open_buckets.values()  # in order of first appearance
        per_rank = self.num_batches_per_rank()
        total = per_rank * self.num_replicas
        batches = [batches[i % len(batches)] for i in range(total)]  # pads by wrapping, or cuts with drop_last
        return batches[self.rank::self.num_replicas]

    def __iter__(self):
        yield from self.batches()[self.start:]

    def __len__(self):
        return self.num_batches_per_rank() - self.start

    def bucket_summary(self) -> str:
        counts = Counter(self.keys)
        lines = [
            f"{len(self.keys)} samples in {len(counts)} size bucket(s), batch size {self.batch_size}: "
            f"{self._total_batches()} batches per epoch, {self.num_batches_per_rank()} per process"
            f" ({self.num_replicas} process(es))"
        ]
        for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            full, rest = divmod(c, self.batch_size)
            tail = "" if rest == 0 else (f", {rest} dropped" if self.drop_last else f" + 1 partial of {rest}")
            lines.append(f"  {_format_key(key)}: {c} samples -> {full} full batch(es){tail}")
        return "\n".join(lines)
