"""LoRA conversions between the merged-QKV and the standard DiT layout, and writers for each key format.

Pure functions take any LoRA read_lora() reads (path or state dict) and return normalised native state dicts
(scale folded into B). Facts page section 4:
- merged -> standard is exact at the same rank: q, k and v share A and take their row slice of B;
- standard -> merged is exact at rank 3r: A stacked, B block-diagonal; a lower rank is an SVD truncation.
"""
import os

import torch

from diffsynth.lora.reader import (
    MERGED_PARTS, PART_OF, LoraError, detect_format, from_modules, lora_architecture, lora_metadata, lora_modules,
    short_name,
)
from diffsynth.utils.io import WeightFileError, read_keys_and_shapes, save_safetensors

FORMATS = ("diffusers", "comfyui", "kohya", "diffsynth", "native")
# diffusers-format keys (`transformer.` prefix, lora_A/B, scale in B) load in diffusers and in ComfyUI.
DEFAULT_FORMAT = "diffusers"
_LORA_KEY_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight",
                     ".lora_A.default.weight", ".lora_B.default.weight",
                     ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")  # LoHa / LoKr (diffsynth.lora.adapters)


def lora_deltas(lora) -> dict[str, torch.Tensor]:
    """{module: delta W = B @ A} in fp32."""
    return {name: B.float() @ A.float() for name, (A, B) in lora_modules(lora).items()}


def lora_to_standard(lora) -> dict[str, torch.Tensor]:
    """Merged -> standard layout, exact at the same rank: q, k, v share A and take rows 0:d, d:2d, 2d:3d of B."""
    out = {}
    for name, (A, B) in lora_modules(lora).items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in MERGED_PARTS:
            out[name] = (A, B)
            continue
        d = B.shape[0] // 3
        for i, part in enumerate(MERGED_PARTS[leaf]):
            # clones: safetensors refuses to save tensors that share memory
            out[f"{parent}.{part}"] = (A.clone(), B[i * d:(i + 1) * d].clone())
    return from_modules(out)


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
    out, groups = {}, {}
    for name, (A, B) in lora_modules(lora).items():
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
    return from_modules(out), errors


def to_format(lora, fmt: str) -> dict[str, torch.Tensor]:
    """Normalised LoRA -> state dict in the key format `fmt` (one of FORMATS), scale folded into the weights.

    kohya and comfyui files carry `.alpha` = rank (scale 1) for readers that expect it; diffusers drops
    `.alpha` keys of lora_A/B files, so the scale must be in the weights anyway.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = {}
    for name, (A, B) in lora_modules(lora).items():
        if fmt in ("kohya", "comfyui"):
            stem = f"lora_unet_{name.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{name}"
            out[f"{stem}.lora_down.weight"] = A
            out[f"{stem}.lora_up.weight"] = B
            out[f"{stem}.alpha"] = torch.tensor(float(A.shape[0]))
        else:
            stem = f"transformer.{name}" if fmt == "diffusers" else name
            tag = ".default" if fmt == "diffsynth" else ""
            out[f"{stem}.lora_A{tag}.weight"] = A
            out[f"{stem}.lora_B{tag}.weight"] = B
    return out


def is_lora_file(path) -> bool:
    """True for a .safetensors file holding LoRA down/up weights (read from the header only)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return False
    try:
        keys = read_keys_and_shapes([path])
    except Exception as e:  # a truncated or foreign file: say which
        raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e
    return any(k.endswith(_LORA_KEY_ENDINGS) for k in keys)


def convert_lora_file(input, output, direction: str, format: str | None = None, rank: int | None = None,
                      extra_metadata: dict | None = None, base_weights=None) -> list[str]:
    """Convert a LoRA file to the standard or merged layout and write it atomically. Returns report lines.

    `format` defaults to diffusers for to_standard (loads in diffusers and ComfyUI) and to native for to_merged
    (merged LoRAs load only in this project's merged DiT). `rank` (to_merged only) compresses by SVD; the
    relative Frobenius error of every changed delta is reported. `extra_metadata` (e.g. the trainer's base model,
    steps, dataset size) is stored in the output beside the conversion's own. On any error nothing is written.
    """
    if direction not in ("to_standard", "to_merged"):
        raise ValueError(f"direction must be to_standard or to_merged, got {direction!r}")
    from diffsynth.lora.adapters import adapter_type, convert_adapter_file

    if adapter_type(input) != "lora":  # LoHa, LoKr, DoRA; `base_weights` (module -> weight) for DoRA to ComfyUI
        return convert_adapter_file(input, output, direction, format, rank, extra_metadata, base_weights)
    if rank is not None and direction != "to_merged":
        raise ValueError("--rank only applies to --direction to_merged (merged -> standard is exact at the same rank)")
    fmt = format or (DEFAULT_FORMAT if direction == "to_standard" else "native")
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    input = os.fspath(input)
    if not is_lora_file(input):
        raise LoraError(f"{input}: not a LoRA file (no lora_A/lora_B/lora_down/lora_up weights); "
                        "full DiT checkpoints are converted without the LoRA path")
    source_format = detect_format(read_keys_and_shapes([input]))
    modules = lora_modules(input)
    before = lora_architecture(from_modules(modules)) or "either"
    report = [f"{input}: LoRA, {source_format} format, {before} layout, {len(modules)} modules, "
              f"rank {_ranks(modules)}"]
    if direction == "to_standard":
        converted, errors, architecture = lora_to_standard(from_modules(modules)), {}, "standard"
    else:
        (converted, errors), architecture = lora_to_merged(from_modules(modules), rank), "merged_qkv"
    if before == architecture:
        report.append(f"already in the {architecture} layout: only the key format changes")
    for name, error in errors.items():
        report.append(f"{name}: rank {_merged_rank(modules, name)} -> {rank}, relative Frobenius error {error:.3e}")
    out_modules = lora_modules(converted)
    top_rank = max(A.shape[0] for A, _ in out_modules.values())
    targets = sorted({short_name(n) for n in out_modules})
    metadata = lora_metadata(converted, architecture, top_rank, top_rank, targets, {
        **(extra_metadata or {}), "converted_from": os.path.basename(input), "direction": direction,
        "key_format": fmt})
    save_safetensors(to_format(converted, fmt), output, metadata)
    report.append(f"wrote {output}: {fmt} format, {architecture} layout, {len(out_modules)} modules, "
                  f"rank {_ranks(out_modules)}")
    if architecture == "merged_qkv" and fmt != "native":
        report.append("note: merged to_qkv/add_qkv_proj LoRAs load only in this project's merged DiT, "
                      "not in diffusers or ComfyUI")
    return report


def _merged_rank(modules, merged_name):
    """Rank of the exact merged LoRA of `merged_name` (sum of its q, k, v parts' ranks)."""
    parent, _, leaf = merged_name.rpartition(".")
    return sum(modules[f"{parent}.{p}"][0].shape[0] for p in MERGED_PARTS[leaf] if f"{parent}.{p}" in modules)


def _ranks(modules) -> str:
    ranks = sorted({A.shape[0] for A, _ in modules.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
