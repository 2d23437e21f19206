"""Image folders as musubi-tuner and ai-toolkit read them -> the metadata file this trainer reads.

A dataset is a folder of targets, each `name.png` with its caption `name.txt`, and one or more control (edit input)
folders. Each control folder gives every target its control image of the same stem (`name.jpg`: the extension may
differ), or several numbered `name_0.png`, `name_1.png`, ... (musubi-tuner's multi-control naming; a bare `name.png`
comes first, then the numbers in numeric order, as musubi-tuner sorts them). Several control folders (ai-toolkit's
list of `control_path`s) append their images to each row in the order the folders are given.

Everything is checked before anything is written, and every problem is reported at once, naming the file and the fix.
"""
import csv
import io
import json
import os
import re
import tomllib

from PIL import Image

from .dataset import DatasetError, listed_problems, parse_file_list

NUMBERED = re.compile(r"(.+)_(\d+)$")  # musubi-tuner's several controls: name_0, name_1 (or name_0000)
OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
# musubi-tuner dataset keys: read, or training settings that are this trainer's flags (printed as a note, not
# converted). Any other key (image_jsonl_file, video_directory, multiple_target, ...) changes what is trained on and
# has no counterpart here: refused by name rather than silently dropped.
MUSUBI_READ = ("image_directory", "control_directory", "caption_extension", "caption_directory")
MUSUBI_TRAINING_KEYS = {
    "resolution": "--max_pixels, or --height/--width", "batch_size": "--batch_size", "num_repeats": "--dataset_repeat",
    "enable_bucket": "buckets by size are always on", "bucket_no_upscale": "targets are never scaled up",
    "cache_directory": "--cache_conditioning", "no_resize_control": "--edit_image_area",
    "control_resolution": "--edit_image_area", "qwen_image_edit_no_resize_control": "--edit_image_area",
    "qwen_image_edit_control_resolution": "--edit_image_area",
}


def image_extensions() -> set[str]:
    """Extensions of the formats Pillow opens (not the save-only ones such as .pdf)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _entries(folder, problems, skip=()):
    """File names in a folder; dotfiles (.DS_Store), subfolders (an edits/ kept inside images/) and `skip` (the
    metadata file, when written into an image folder) are no samples. A broken symbolic link is a problem, not
    skipped: it names a sample (a target, caption or control) that would otherwise be silently left out."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    for n in names:
        path = os.path.join(folder, n)
        if os.path.islink(path) and not os.path.exists(path):
            problems.append(f"  {path}: a broken symbolic link (its target {os.readlink(path)} does not exist); "
                            "restore the file it points to, or remove the link")
    return [n for n in names if os.path.isfile(os.path.join(folder, n)) and os.path.join(folder, n) not in skip]


def _read_caption(path, problems):
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")  # a BOM (Windows Notepad) is not part of the prompt
    except UnicodeDecodeError as e:
        problems.append(f"  {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8")
        return None
    except OSError as e:
        problems.append(f"  {path}: cannot be read ({e.strerror}); check its permissions")
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()  # as a text-mode read, newlines inside are kept
    if not text:
        problems.append(f"  {path}: empty caption; write the edit instruction in it")
        return None
    return text


def _scan_dataset(images, controls, caption_extension, caption_dir, problems, skip) -> list[dict]:
    """Rows {image, edit_image: [paths], prompt} of one dataset (absolute paths); problems are appended."""
    exts = image_extensions()
    images, controls = os.path.abspath(images), [os.path.abspath(c) for c in controls]
    caption_dir = os.path.abspath(caption_dir or images)
    missing = [f for f in dict.fromkeys([images, caption_dir, *controls]) if not os.path.isdir(f)]
    problems += [f"  {f}: folder not found" for f in missing]
    if images in missing or caption_dir in missing:
        return []
    for c in controls:
        if c not in missing and os.path.samefile(c, images):
            problems.append(f"  {c}: the control folder is the target folder; the edit inputs go in their own folder")
            missing.append(c)
    controls = [c for c in controls if c not in missing]  # the others are still checked, every problem at once
    for i, c in enumerate(controls):  # each row would get that folder's image twice
        if any(os.path.samefile(c, earlier) for earlier in controls[:i]):
            problems.append(f"  {c}: given twice as a control folder; give each control folder once")
    controls = [c for i, c in enumerate(controls) if not any(os.path.samefile(c, e) for e in controls[:i])]

    targets, captions = {}, {}  # stem -> file name
    for name in _entries(images, problems, skip):
        if name.endswith(caption_extension):
            captions[name[:-len(caption_extension)]] = name
        elif os.path.splitext(name)[1].lower() in exts:
            targets.setdefault(os.path.splitext(name)[0], []).append(name)
        else:
            problems.append(f"  {os.path.join(images, name)}: not an image (nor a {caption_extension} caption); move "
                            "it out of the folder, or convert it to PNG/JPEG if it is a picture")
    if caption_dir != images:
        captions = {n[:-len(caption_extension)]: n for n in _entries(caption_dir, problems)
                    if n.endswith(caption_extension)}
    if not targets:
        problems.append(f"  {images}: holds no images; expected targets such as name.png with name{caption_extension}")
    for stem, names in targets.items():
        if len(names) > 1:
            problems.append(f"  {images}: {' and '.join(names)} are two targets named {stem!r}; keep one")
    for stem in sorted(set(captions) - set(targets)):
        problems.append(f"  {os.path.join(caption_dir, captions[stem])}: caption without a target image {stem}.* in "
                        f"{images}; add the image or remove the caption")

    edits = {stem: [] for stem in targets}  # stem -> control paths, folder by folder
    for folder in controls:
        found = {}  # (target stem, number or -1 for the bare name) -> file name
        for name in _entries(folder, problems, skip):
            stem, ext = os.path.splitext(name)
            numbered = NUMBERED.match(stem)
            if ext.lower() not in exts:
                problems.append(f"  {os.path.join(folder, name)}: not an image; move it out of the control folder, or "
                                "convert it to PNG/JPEG if it is a picture")
                continue
            if stem in targets:  # an exact name wins: target a_1's control is a_1.png, not a's second one
                key = (stem, -1)
            elif numbered and numbered.group(1) in targets:
                key = (numbered.group(1), int(numbered.group(2)))
            else:
                names = f"{stem}.* or {numbered.group(1)}.*" if numbered else f"{stem}.*"
                problems.append(f"  {os.path.join(folder, name)}: control image without a target (no {names} in "
                                f"{images}); add its target or remove it")
                continue
            if key in found:
                problems.append(f"  {folder}: {found[key]} and {name} are both control "
                                f"{'of' if key[1] < 0 else f'number {key[1]} of'} target {key[0]!r}; keep one")
                continue
            found[key] = name
        for stem in targets:
            mine = sorted((n, name) for (s, n), name in found.items() if s == stem)
            if not mine:
                problems.append(f"  {os.path.join(images, targets[stem][0])}: no control image in {folder} (expected "
                                f"{stem}.png, or {stem}_0.png, {stem}_1.png, ... for several)")
            edits[stem] += [os.path.join(folder, name) for _, name in mine]

    rows = []
    for stem in sorted(targets):
        if stem not in captions:
            problems.append(f"  {os.path.join(images, targets[stem][0])}: no caption file "
                            f"{os.path.join(caption_dir, stem + caption_extension)}; write the edit instruction in it")
            continue
        prompt = _read_caption(os.path.join(caption_dir, captions[stem]), problems)
        if prompt is not None:
            rows.append({"image": os.path.join(images, targets[stem][0]), "edit_image": edits[stem], "prompt": prompt})
    return rows


def caption_suffix(ext) -> str:
    """'txt' (ai-toolkit's caption_ext) or '.txt' (musubi-tuner's caption_extension) -> '.txt'."""
    return ext if "." in ext else "." + ext


def folders_to_rows(datasets, output=None) -> list[dict]:
    """Rows of every dataset ({images, controls, caption_extension, caption_dir}); one DatasetError lists every
    problem of all of them. The `output` metadata file, if in one of the folders, is not read as a sample."""
    skip = {os.path.abspath(output)} if output else set()
    rows, problems = [], []
    for d in datasets:
        rows += _scan_dataset(d["images"], d["controls"], caption_suffix(d.get("caption_extension") or ".txt"),
                              d.get("caption_dir"), problems, skip)
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in the image folders; nothing was written:\n"
                           + listed_problems(problems))
    return rows


def read_musubi_config(path) -> tuple[list[dict], list[str]]:
    """The datasets of a musubi-tuner dataset TOML, and notes on the training settings it holds that are not
    converted. Relative directories are taken from the working directory, as musubi-tuner opens them."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset config not found (--musubi_config)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid TOML ({e})") from None
    problems, notes = [], {}
    extra = sorted(set(config) - {"general", "datasets"})
    if extra:
        problems.append(f"  top-level {', '.join(extra)}: not a musubi-tuner dataset config section ([general] and "
                        "[[datasets]] are)")
    general, entries = config.get("general", {}), config.get("datasets", [])
    if not isinstance(general, dict):
        problems.append("  general: expected a [general] table of settings")
        general = {}
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        problems.append("  datasets: expected [[datasets]] entries (double brackets: one table per dataset)")
        entries = []
    elif not entries:
        problems.append("  no [[datasets]] entry; add one with image_directory and control_directory")
    datasets = []
    for i, entry in enumerate(entries, 1):
        where = f"[[datasets]] {i}"
        merged = {**general, **entry}  # a dataset's own value wins over [general], as in musubi-tuner
        wrong = [k for k in MUSUBI_READ if k in merged and not isinstance(merged[k], str)]
        if wrong:
            problems.append(f"  {where}: {', '.join(f'{k} = {merged[k]!r}' for k in wrong)}: expected text in quotes, "
                            'e.g. image_directory = "/path/to/images"')
            continue
        for key in merged:
            if key in MUSUBI_TRAINING_KEYS:
                notes[key] = MUSUBI_TRAINING_KEYS[key]
        unknown = [k for k in merged if k not in MUSUBI_READ and k not in MUSUBI_TRAINING_KEYS]
        if unknown:
            problems.append(f"  {where}: {', '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} no counterpart "
                            f"here (only folders of targets, captions and controls convert: {', '.join(MUSUBI_READ)}); "
                            "remove it or convert that dataset another way")
        if not merged.get("image_directory") or not merged.get("control_directory"):
            missing = [k for k in ("image_directory", "control_directory") if not merged.get(k)]
            problems.append(f"  {where}: no {' and no '.join(missing)}; Qwen-Image-Edit training needs targets and "
                            "their control images")
            continue
        datasets.append({"images": merged["image_directory"], "controls": [merged["control_directory"]],
                         "caption_extension": merged.get("caption_extension", ".txt"),
                         "caption_dir": merged.get("caption_directory")})
    if problems:
        raise DatasetError(f"{path}:\n" + "\n".join(problems))
    return datasets, [f"{k} is not converted: it is a training setting ({v})" for k, v in sorted(notes.items())]


def _cell(rels, csv_format):
    """A file column's value that parse_file_list reads back as `rels`: a path, `a|b` in CSV, else a JSON list."""
    if len(rels) == 1 and "|" not in rels[0] and not rels[0].startswith("["):
        return rels[0]
    if csv_format:
        plain = not any("|" in r for r in rels) and not rels[0].startswith("[")
        return "|".join(rels) if plain else json.dumps(rels, ensure_ascii=False)
    return rels


def check_output(output, overwrite=False) -> str:
    """The output's format (its extension); an unsupported one, or an existing file without `overwrite`, raises."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise DatasetError(f"--output {output}: unsupported extension {ext or '(none)'!r}; name a "
                           f"{', '.join(OUTPUT_FORMATS)} file")
    if os.path.isdir(output):
        raise DatasetError(f"--output {output} is a folder; name a metadata file in it, e.g. {output}/metadata.csv")
    if os.path.exists(output) and not overwrite:
        raise DatasetError(f"--output {output} exists; pass --overwrite to replace it, or name another file")
    return ext


def write_metadata(rows, output, overwrite=False) -> list[dict]:
    """Write rows as `output` (.csv, .json or .jsonl by its extension) with paths relative to its folder, atomically;
    returns the rows as written."""
    from ..utils.io import atomic_path

    ext = check_output(output, overwrite)
    base = os.path.dirname(os.path.abspath(output))
    written, problems = [], []
    for row in rows:
        cells = {}
        for column in ("image", "edit_image"):
            paths = row[column] if column == "edit_image" else [row[column]]
            rels = [os.path.relpath(p, base) for p in paths]
            cells[column] = _cell(rels, ext == ".csv")
            if parse_file_list(cells[column]) != rels:  # e.g. a name with spaces at its ends, which the reader strips
                problems.append(f"  {paths[0] if len(paths) == 1 else ', '.join(paths)}: a file name the metadata "
                                "cannot hold as it is; rename it without leading or trailing spaces")
        written.append({**cells, "prompt": row["prompt"]})
    if problems:
        raise DatasetError(f"{len(problems)} file name(s) cannot be written; nothing was written:\n"
                           + listed_problems(problems))
    text = io.StringIO(newline="")
    if ext == ".csv":  # the csv module quotes a prompt holding a comma, a quote or a newline
        writer = csv.DictWriter(text, ["image", "edit_image", "prompt"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(written)
    elif ext == ".jsonl":
        text.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in written)
    else:
        json.dump(written, text, ensure_ascii=False, indent=1)
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text.getvalue())
    return written
