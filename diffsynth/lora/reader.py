"""Read a Qwen-Image DiT LoRA in any format users meet and normalise it.

Formats (facts page section 4): diffusers `transformer.<module>.lora_A/B.weight`, ComfyUI
`diffusion_model.<module>...`, bare `<module>...`, kohya/musubi `lora_unet_<module_with_underscores>.lora_down/up.weight`
+ `.alpha`, DiFFSynth `<module>.lora_A.default.weight`, and this project's native files (bare keys + `.alpha`; rank
and alpha also in the safetensors metadata). Both DiT layouts are understood: separate `to_q/to_k/to_v` and merged
`to_qkv`. ComfyUI's own trainer adds `<module>.diff_b` (a bias delta, for every biased linear) and `<module>.diff`
(a full weight delta; it writes them for the 1-D norm weights): both are read, for linears and norms.

The normalised form is a plain state dict with native keys `<module>.lora_A.weight` (r x in) and
`<module>.lora_B.weight` (out x r) whose alpha/rank scale is already folded into B: delta W = B @ A; plus
`<module>.diff` (delta of the weight, its shape) and `<module>.diff_b` (delta of the bias), applied at scale 1.
"""
import json
import math
import os
import re

import torch

from diffsynth.utils.io import load_safetensors, read_metadata

FORMAT = "diffsynth-qwen-image-lora"  # the metadata's `format` in the LoRA files this project writes
FORMAT_VERSION = "1"
ARCHITECTURES = ("merged_qkv", "standard")

# Linear layers of one DiT block -> (out, in) as multiples of the model width d (None: not tied to d).
BLOCK_LINEARS = {
    "attn.to_q": (1, 1), "attn.to_k": (1, 1), "attn.to_v": (1, 1),
    "attn.add_q_proj": (1, 1), "attn.add_k_proj": (1, 1), "attn.add_v_proj": (1, 1),
    "attn.to_qkv": (3, 1), "attn.add_qkv_proj": (3, 1),
    "attn.to_out.0": (1, 1), "attn.to_add_out": (1, 1),
    "img_mod.1": (6, 1), "txt_mod.1": (6, 1),
    "img_mlp.net.0.proj": (4, 1), "img_mlp.net.2": (1, 4),
    "txt_mlp.net.0.proj": (4, 1), "txt_mlp.net.2": (1, 4),
}
# Modules with a 1-D weight that a `.diff` may change: the q/k RMSNorms and the text input norm.
BLOCK_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
TOP_NORMS = ("txt_norm",)
TOP_LINEARS = {
    "img_in": (1, None), "txt_in": (1, None), "proj_out": (None, 1), "norm_out.linear": (2, 1),
    "time_text_embed.timestep_embedder.linear_1": (1, None), "time_text_embed.timestep_embedder.linear_2": (1, 1),
}
# merged leaf -> its q, k, v parts, in row order
MERGED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}
PART_OF = {part: (merged, i) for merged, parts in MERGED_PARTS.items() for i, part in enumerate(parts)}

# kohya flattens module paths with underscores, which is ambiguous in general (`to_out_0`, `linear_1`);
# mapping back through the known names is exact.
_KOHYA_BLOCK = {name.replace(".", "_"): name for name in (*BLOCK_LINEARS, *BLOCK_NORMS)}
_KOHYA_TOP = {name.replace(".", "_"): name for name in (*TOP_LINEARS, *TOP_NORMS)}
_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_KOHYA_BLOCK_RE = re.compile(r"transformer_blocks_(\d+)_(.+)")

_SUFFIXES = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
DIFF_ROLES = ("diff", "diff_b")
_PREFIXES = ("transformer.", "diffusion_model.")
_PEFT_PREFIX = "base_model.model."  # peft's save_pretrained wraps every key in it
# Metadata fields in which trainers (kohya sd-scripts, musubi-tuner) name the base model. A Flux LoRA on the double
# blocks has Qwen-Image's key names and shapes that may fit; only this metadata tells it apart.
BASE_MODEL_FIELDS = ("modelspec.architecture", "ss_base_model_version")
_OTHER_MODELS = re.compile(r"flux|stable-diffusion|sdxl|sd[-_.]?v?[0-9]|hunyuan|wan[0-9]|z-image|hidream|chroma|"
                           r"auraflow|kandinsky", re.IGNORECASE)


class LoraError(ValueError):
    """A LoRA that cannot be used as given (not a LoRA, another model's LoRA, wrong shapes, bad names)."""


def _known(name: str) -> bool:
    m = _BLOCK_RE.fullmatch(name)
    return (m is not None and m.group(2) in (*BLOCK_LINEARS, *BLOCK_NORMS)) or name in (*TOP_LINEARS, *TOP_NORMS)


def is_norm(name: str) -> bool:
    return short_name(name) in (*BLOCK_NORMS, *TOP_NORMS)


def _module_name(stem: str) -> str | None:
    """Key stem (key without its lora suffix) -> module path in the DiT, or None if it names no DiT linear."""
    if stem.startswith("lora_unet_"):
        flat = stem[len("lora_unet_"):]
        m = _KOHYA_BLOCK_RE.fullmatch(flat)
        if m:
            rest = _KOHYA_BLOCK.get(m.group(2))
            return f"transformer_blocks.{m.group(1)}.{rest}" if rest else None
        return _KOHYA_TOP.get(flat)
    stem = stem.removeprefix(_PEFT_PREFIX)
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    return stem if _known(stem) else None


def short_name(module: str) -> str:
    """`transformer_blocks.3.attn.to_qkv` -> `attn.to_qkv` (the form `--lora_target_modules` takes)."""
    m = _BLOCK_RE.fullmatch(module)
    return m.group(2) if m else module


def _summary(keys, limit=8) -> str:
    keys = list(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _parse(sd: dict, source: str) -> dict:
    """Group the keys of a LoRA state dict by module: {module: {"A": t, "B": t, "alpha": t}}."""
    modules, unknown, foreign = {}, [], []
    for key, value in sd.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                if role == "alpha":
                    alpha_value(value, key, source)
                name = _module_name(key[: -len(suffix)])
                if name is None:
                    foreign.append(key)
                    break
                entry = modules.setdefault(name, {})
                if role in entry:
                    raise LoraError(f"{source}: two keys give {role} of module {name} (second: {key}); "
                                    "the file mixes key formats for one module")
                entry[role] = value
                break
        else:
            unknown.append(key)
    if not modules and not foreign:
        raise LoraError(f"{source}: not a LoRA: no key ends with lora_A/lora_B/lora_down/lora_up .weight "
                        f"(keys: {_summary(sd)}). For a full DiT checkpoint use the checkpoint conversion.")
    if foreign:
        raise LoraError(f"{source}: not a Qwen-Image DiT LoRA: {len(foreign)} keys name no linear layer of the "
                        f"Qwen-Image DiT: {_summary(foreign)}. Is this a LoRA for another model?")
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys are not LoRA down/up/alpha/diff/diff_b weights and cannot be "
                        f"used (DoRA, LoHa, LoKr and LoCon mid weights are not supported): {_summary(unknown)}")
    for name, entry in modules.items():
        if ("A" in entry) != ("B" in entry) or (not any(r in entry for r in ("A", *DIFF_ROLES))):
            missing = "down (lora_A)" if "A" not in entry else "up (lora_B)"
            raise LoraError(f"{source}: module {name} has no {missing} weight; the file is incomplete")
        if is_norm(name) and set(entry) - {"diff"}:
            raise LoraError(f"{source}: module {name} is a norm: only a `.diff` of its weight can change it, "
                            f"but the file gives {', '.join(sorted(set(entry) - {'diff'}))}")
        if "A" in entry:
            A, B = entry["A"], entry["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise LoraError(f"{source}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                "are not a rank-r pair (r x in, out x r) of linear LoRA weights")
            if A.shape[0] == 0:
                raise LoraError(f"{source}: module {name} has rank 0 (lora_A {tuple(A.shape)}): it holds no "
                                "weights; the file is empty or damaged, re-save it from a trained LoRA")
        elif "alpha" in entry:
            raise LoraError(f"{source}: module {name} has an alpha but no lora_A/lora_B weights")
        want_ndim = {"diff": 1 if is_norm(name) else 2, "diff_b": 1}
        for role in DIFF_ROLES:
            if role in entry and entry[role].ndim != want_ndim[role]:
                raise LoraError(f"{source}: module {name}: .{role} has shape {tuple(entry[role].shape)}; expected a "
                                f"{want_ndim[role]}-D delta of its {'bias' if role == 'diff_b' else 'weight'}")
    return modules


def _check_shapes(modules: dict, source: str, diffs: dict | None = None):
    """All shapes must fit one DiT width d: catches LoRAs of other models that reuse the module names."""
    width, witness = None, None
    sizes = [(name, B.shape[0], A.shape[1]) for name, (A, B) in modules.items()]
    for name, entry in (diffs or {}).items():
        if is_norm(name):
            continue  # a head-dim or text-width vector: not a multiple of d
        if "diff" in entry:
            sizes.append((name, *entry["diff"].shape))
        if "diff_b" in entry:
            sizes.append((name, entry["diff_b"].shape[0], None))
    for name, out_size, in_size in sizes:
        out_mult, in_mult = BLOCK_LINEARS.get(short_name(name)) or TOP_LINEARS[name]
        for mult, size in ((out_mult, out_size), (in_mult, in_size)):
            if mult is None or size is None:
                continue
            if width is None and size % mult == 0:
                width, witness = size // mult, name
            elif width is None or size != mult * width:
                fit = f"a Qwen-Image DiT of width {width} (read from {witness})" if width else "a Qwen-Image DiT"
                raise LoraError(f"{source}: module {name} has shape {out_size}x{in_size} (out x in), which "
                                f"does not fit {fit}. Is this a LoRA for another model?")


def alpha_value(value: torch.Tensor, key: str, source: str) -> float:
    """A `.alpha` tensor -> its number, or a LoraError naming the file and key (it must be one finite number)."""
    if value.numel() != 1 or not torch.isfinite(value.float()).all():
        shown = value.flatten()[:4].float().tolist()
        raise LoraError(f"{source}: {key} must be one finite number (the LoRA's alpha), got {value.numel()} "
                        f"value(s) {shown}; the file is damaged or not a LoRA")
    return value.item()


def metadata_scale(metadata: dict, source: str) -> float:
    """alpha / rank from a native file's metadata, or a LoraError naming the file and the field."""
    values = {}
    for field in ("alpha", "rank"):
        try:
            values[field] = float(metadata[field])
        except ValueError:
            values[field] = math.nan
        if not math.isfinite(values[field]) or (field == "rank" and values[field] <= 0):
            raise LoraError(f"{source}: metadata field {field!r} is {metadata[field]!r}; it must be a finite number"
                            f"{' > 0' if field == 'rank' else ''}: the file's metadata is damaged, re-save it "
                            "(or drop the metadata to read the tensors alone)")
    return values["alpha"] / values["rank"]


def nonfinite_keys(sd: dict) -> list[str]:
    """Keys of floating tensors holding NaN or inf (fp8 upcast first: torch has no isfinite for it)."""
    return [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]


def check_file(path, source: str):
    """A LoRA path must be an existing .safetensors file (not a folder)."""
    if not os.fspath(path).endswith(".safetensors"):
        raise LoraError(f"{source}: LoRAs are read from .safetensors files only")
    if os.path.isdir(path):
        raise LoraError(f"{source}: is a folder; give the .safetensors file inside it")
    if not os.path.isfile(path):
        raise LoraError(f"{source}: file not found")


def load_file(path, source: str) -> tuple[dict, dict]:
    """A LoRA / LoHa / LoKr / DoRA file -> (state dict, metadata); a LoraError for a path that is no .safetensors
    file and for metadata naming another base model."""
    check_file(path, source)
    sd, metadata = load_safetensors(path), read_metadata(path)  # load first: it names a damaged file
    for field in BASE_MODEL_FIELDS:
        value = metadata.get(field, "")
        if "qwen" not in value.lower() and _OTHER_MODELS.search(value):
            raise LoraError(f"{source}: metadata field {field!r} is {value!r}: a LoRA for another model, not "
                            "Qwen-Image (its key names fit the Qwen-Image DiT, its weights do not); use a Qwen-Image "
                            "LoRA")
    return sd, metadata


def _read_raw(lora, source=None):
    """Path or state dict -> ({module: (A, B)} unscaled, {module: scale}, {module: {diff/diff_b: t}}, metadata)."""
    if isinstance(lora, (str, os.PathLike)):
        source = source or os.fspath(lora)
        sd, metadata = load_file(lora, source)
    elif isinstance(lora, dict):
        source, sd, metadata = source or "LoRA state dict", lora, {}
    else:
        raise TypeError(f"expected a LoRA path or state dict, got {type(lora).__name__}")
    entries = _parse(sd, source)
    bad = nonfinite_keys(sd)
    if bad:
        raise LoraError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values ({_summary(bad, 4)}); the LoRA is "
                        "damaged or was saved from a diverged run, and would turn every output into NaN. Use an "
                        "earlier checkpoint")
    # Our own files keep alpha and rank in the metadata; they apply to modules without an `.alpha` key.
    default_scale = 1.0
    if metadata.get("format_version") and "alpha" in metadata and "rank" in metadata:
        default_scale = metadata_scale(metadata, source)
    modules, scales, diffs = {}, {}, {}
    for name, entry in entries.items():
        if "A" in entry:
            modules[name] = (entry["A"], entry["B"])
            alpha = entry.get("alpha")
            scales[name] = float(alpha) / entry["A"].shape[0] if alpha is not None else default_scale
        if any(role in entry for role in DIFF_ROLES):
            diffs[name] = {role: entry[role] for role in DIFF_ROLES if role in entry}
    _check_shapes(modules, source, diffs)
    return modules, scales, diffs, metadata


def read_lora(lora, source: str | None = None) -> dict[str, torch.Tensor]:
    """Any supported LoRA (path or state dict) -> normalised native state dict with the scale folded into B.

    A state dict without `.alpha` keys is taken as already scaled (alpha == rank), as diffusers does.
    Tensors keep their dtype; the scale is applied in fp32.
    """
    modules, scales, diffs, _ = _read_raw(lora, source)
    for name, (A, B) in modules.items():
        if scales[name] != 1.0:
            modules[name] = (A, (B.float() * scales[name]).to(B.dtype))
    return from_modules(modules, diffs)


def lora_modules(lora) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Normalised LoRA (or anything read_lora reads) -> {module: (A, B)} (its low-rank pairs only)."""
    sd = read_lora(lora)
    return {k[: -len(".lora_A.weight")]: (v, sd[k[: -len("A.weight")] + "B.weight"])
            for k, v in sd.items() if k.endswith(".lora_A.weight")}


def lora_diffs(lora) -> dict[str, dict[str, torch.Tensor]]:
    """Normalised LoRA (or anything read_lora reads) -> {module: {"diff": weight delta, "diff_b": bias delta}}."""
    diffs = {}
    for key, value in read_lora(lora).items():
        name, _, role = key.rpartition(".")
        if role in DIFF_ROLES:
            diffs.setdefault(name, {})[role] = value
    return diffs


def from_modules(modules: dict, diffs: dict | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, (A, B) in modules.items():
        out[f"{name}.lora_A.weight"] = A
        out[f"{name}.lora_B.weight"] = B
    for name, entry in (diffs or {}).items():
        for role, value in entry.items():
            out[f"{name}.{role}"] = value
    return out


def lora_architecture(lora) -> str | None:
    """"merged_qkv", "standard", or None when the LoRA touches no q/k/v projection (fits either DiT)."""
    sd = read_lora(lora)
    leaves = {name.rsplit(".", 1)[-1] for name in (*lora_modules(sd), *lora_diffs(sd))}
    merged, standard = bool(leaves & set(MERGED_PARTS)), bool(leaves & set(PART_OF))
    if merged and standard:
        raise LoraError("LoRA mixes merged (to_qkv/add_qkv_proj) and separate (to_q/to_k/to_v) projections")
    return "merged_qkv" if merged else "standard" if standard else None


def detect_format(keys) -> str:
    """Name of the key format of a LoRA state dict (for reports)."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith(_PEFT_PREFIX) for k in keys):
        return "peft"
    if any(".default." in k for k in keys):
        return "diffsynth"
    return "native"


def lora_metadata(lora: dict, architecture: str | None, rank, alpha, target_modules, extra=None) -> dict:
    """Safetensors metadata of the files this project writes (values are strings)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    found = lora_architecture(lora) if lora else None  # {}: a LoHa / LoKr / DoRA file (diffsynth.lora.adapters)
    if found is not None and found != architecture:
        raise ValueError(f"architecture {architecture!r} contradicts the LoRA's keys, which are {found}")
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "rank": str(int(rank)),
        "alpha": str(float(alpha)),
        "target_modules": ",".join(target_modules),
    }
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


def carried_metadata(path) -> dict:
    """What a conversion keeps of the metadata of a LoRA file this project wrote: all but the fields lora_metadata
    writes anew for the output (layout, rank, alpha, targets, format), so the training's record (base model, steps,
    dataset size, the --edit_image_area the inference script defaults to) survives the conversion. Other tools'
    metadata is not kept: their rank and alpha fields would be false once the scale is folded into the weights."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        return {}
    own = ("format", "format_version", "architecture", "rank", "alpha", "target_modules")
    return {k: v for k, v in meta.items() if k not in own}
