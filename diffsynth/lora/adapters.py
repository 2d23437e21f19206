"""LoHa, LoKr and DoRA adapters (trained through peft, `--lora_type`) next to plain LoRA: save, read, fuse, export.

Keys. Native files (this trainer) keep peft's names without the adapter name: `<module>.hada_w1_a/_b`,
`.hada_w2_a/_b` (LoHa), `<module>.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b` (LoKr),
`<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (DoRA); rank, alpha and `lora_type` in the
metadata, scale alpha/rank as in peft, and for LoHa / LoKr `<module>.alpha` tensors (what ComfyUI reads).
ComfyUI (`diffusion_model.<module>.`) and kohya/LyCORIS (`lora_unet_...`) files use LyCORIS' names (the same
`hada_*` / `lokr_*`, `lora_down/up`, `.alpha`, DoRA's `.dora_scale`).

Deltas (W the base weight, s the scale): LoHa s (w1a w1b) * (w2a w2b); LoKr s kron(w1, w2); DoRA
m * V / ||V|| per output row with V = W + s B A (peft). ComfyUI applies an output-axis `dora_scale` d as
V * d / (||W|| + eps), normalising by the BASE weight's row norms (an open ComfyUI issue: its PR 15458 would use
||V||); so a ComfyUI export writes d = m (||W|| + eps) / ||V||, computed from the base weights, which ComfyUI as
released then applies exactly as peft does. Reading a `dora_scale` file applies ComfyUI's rule too.

Layouts. Merged -> standard is exact for LoHa (w1a, w2a split by rows), DoRA (B, m split by rows; the norms are
per row) and LoKr when the row factor of w1 divides by 3 (kron(w1, w2) row blocks are then kron(w1 rows, w2));
otherwise the split is no Kronecker product and is refused. Standard -> merged conversion is LoRA-only; any
adapter fuses into either DiT (`fuse_lora`, the inference script's `--lora_path`).
"""
import os

import torch

from diffsynth.lora.reader import (
    MERGED_PARTS, PART_OF, LoraError, _module_name, alpha_value, carried_metadata, load_file, lora_metadata,
    metadata_scale, nonfinite_keys, short_name,
)
from diffsynth.utils.io import load_safetensors, read_keys_and_shapes, save_safetensors

LORA_TYPES = ("lora", "loha", "lokr", "dora")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# suffix of a key -> the role it plays; LoRA's own suffixes serve DoRA
_ROLES = {**{"." + n: n for n in _LOHA + _LOKR + ("lokr_t2",)},
          ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
          ".lora_magnitude_vector": "magnitude", ".dora_scale": "dora_scale", ".alpha": "alpha"}
# keys written in fp32 whatever the weights' dtype: a DoRA's per-row magnitude (peft's or ComfyUI's dora_scale),
# and alpha
KEEP_FP32 = (".lora_magnitude_vector", ".dora_scale", ".alpha")
_EPS = torch.finfo(torch.float32).eps  # ComfyUI adds its compute dtype's eps (float32) to the norm


def _keys(lora):
    if isinstance(lora, dict):
        return list(lora)
    path = os.fspath(lora)
    try:
        return list(read_keys_and_shapes([path])) if path.endswith(".safetensors") and os.path.isfile(path) else []
    except Exception:  # not a readable safetensors file: the LoRA reader reports it
        return []


def adapter_type(lora) -> str:
    """"loha", "lokr", "dora" or "lora" (anything else, left to the LoRA reader) from the keys alone."""
    keys = _keys(lora)
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(k.endswith((".lora_magnitude_vector", ".dora_scale")) for k in keys):
        return "dora"
    return "lora"


def check_any(lora) -> bool:
    """Read a LoRA, LoHa, LoKr or DoRA as fuse_lora will, so that its LoraError comes before any model loads.
    -> True when fusing it changes nothing: every delta is zero (alpha 0; untrained: B = 0, a zero LoHa/LoKr factor)."""
    from diffsynth.lora.reader import lora_diffs, lora_modules, read_lora

    if adapter_type(lora) == "lora":
        sd = read_lora(lora)
        pairs = lora_modules(sd).values()
        diffs = [t for entry in lora_diffs(sd).values() for t in entry.values()]
        return not any(A.float().any() and B.float().any() for A, B in pairs) and not any(t.float().any()
                                                                                       for t in diffs)
    modules, _ = read_adapters(lora)
    # one all-zero factor zeroes a LoHa / LoKr delta (peft initialises them so); DoRA renormalises even at scale 0
    return all(a.kind != "dora" and (a.scale == 0 or not all(t.float().any() for t in a.t.values()))
               for a in modules.values())


class Adapter:
    """One module's adapter: `kind`, its tensors by role, the scale, and the DoRA rule ("peft": magnitude of
    W + sBA; "comfy_out" / "comfy_in": ComfyUI's dora_scale by output rows / input columns)."""

    def __init__(self, kind, tensors, scale=1.0, dora=None):
        self.kind, self.t, self.scale, self.dora = kind, tensors, scale, dora

    def _w(self, n):
        t = self.t
        return (t[f"lokr_{n}"] if f"lokr_{n}" in t else t[f"lokr_{n}_a"] @ t[f"lokr_{n}_b"]).float()

    def shape(self):
        t = self.t
        if self.kind == "loha":
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        if self.kind == "lokr":
            (a, b), (c, d) = self._w("w1").shape, self._w("w2").shape
            return a * c, b * d
        return t["B"].shape[0], t["A"].shape[1]

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """W' - W in fp32 for the base weight `base` (which DoRA needs; the others ignore it)."""
        t, s = self.t, self.scale
        if self.kind == "loha":
            return (t["hada_w1_a"].float() @ t["hada_w1_b"].float()) * (t["hada_w2_a"].float() @ t["hada_w2_b"].float()) * s
        if self.kind == "lokr":
            return torch.kron(self._w("w1"), self._w("w2")) * s
        w = base.float()
        v = w + (t["B"].float() @ t["A"].float()) * s
        if self.dora == "peft":
            return t["magnitude"].float()[:, None] * v / v.norm(dim=1, keepdim=True) - w
        d = t["dora_scale"].float()
        if self.dora == "comfy_out":
            return v * d.reshape(-1, 1) / (w.norm(dim=1, keepdim=True) + _EPS) - w
        return v * d.reshape(1, -1) / (v.norm(dim=0, keepdim=True) + _EPS) - w

    def split_rows(self, parts: int, name: str) -> list["Adapter"]:
        """The adapters of `parts` equal row blocks (to_qkv -> to_q, to_k, to_v), exactly, or a LoraError."""
        t = dict(self.t)
        if self.kind == "loha":
            rows = ("hada_w1_a", "hada_w2_a")
        elif self.kind == "dora":
            if self.dora == "comfy_in":
                raise LoraError(f"{name}: an input-axis DoRA (dora_scale 1 x in) normalises columns over q, k and v "
                                "together; it cannot be split into to_q/to_k/to_v exactly")
            rows = ("B", "magnitude" if self.dora == "peft" else "dora_scale")
        else:
            key = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
            if t[key].shape[0] % parts:
                raise LoraError(
                    f"{name}: a LoKr of to_qkv splits into to_q/to_k/to_v only when its row factor ({t[key].shape[0]} "
                    f"rows of lokr_w1) divides by {parts}; this one's q/k/v blocks are no Kronecker products, so no "
                    "standard-layout file can hold it. It loads into either DiT of this project as it is; for a "
                    "ComfyUI LoKr train it on the standard DiT (train.py), or use --lora_type loha or dora")
            rows = (key,)
        out = []
        for i in range(parts):
            part = dict(t)
            for r in rows:
                n = t[r].shape[0] // parts
                part[r] = t[r][i * n:(i + 1) * n].clone()
            out.append(Adapter(self.kind, part, self.scale, self.dora))
        return out


def read_adapters(lora, source=None) -> tuple[dict[str, Adapter], dict]:
    """Path or state dict of a LoHa / LoKr / DoRA in any key format -> ({module: Adapter}, file metadata)."""
    if isinstance(lora, dict):
        sd, metadata, source = lora, {}, source or "adapter state dict"
    else:
        source = source or os.fspath(lora)
        sd, metadata = load_file(lora, source)
    kind = adapter_type(sd)
    entries, unknown = {}, []
    for key, value in sd.items():
        suffix = next((s for s in sorted(_ROLES, key=len, reverse=True) if key.endswith(s)), None)
        name = _module_name(key[: -len(suffix)]) if suffix else None
        if name is None:
            unknown.append(key)
            continue
        if suffix == ".alpha":
            alpha_value(value, key, source)
        entries.setdefault(name, {})[_ROLES[suffix]] = value
    bad = nonfinite_keys(sd)
    if bad:
        raise LoraError(f"{source}: {len(bad)} tensors hold NaN or inf values ({', '.join(bad[:4])}); the file is "
                        "damaged or comes from a diverged run")
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise LoraError(f"{source}: {empty[0]} has shape {tuple(sd[empty[0]].shape)}: rank 0, it holds no weights; "
                        "the file is empty or damaged, re-save it from a trained adapter")
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} keys name no linear layer of the Qwen-Image DiT or no {kind} "
                        f"weight: {', '.join(unknown[:8])}")
    native = metadata.get("lora_type") == kind and "alpha" in metadata and "rank" in metadata
    native_scale = metadata_scale(metadata, source) if native else None
    modules = {}
    for name, t in entries.items():
        if "lokr_t2" in t:
            raise LoraError(f"{source}: {name} is a Tucker-decomposed (conv) LoKr; the DiT has only linear layers")
        alpha = t.pop("alpha", None)
        alpha = float(alpha) if alpha is not None else None
        if kind == "loha":
            missing = [r for r in _LOHA if r not in t]
            scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None and not missing else 1.0
        elif kind == "lokr":
            missing = [n for n in ("w1", "w2") if f"lokr_{n}" not in t and not {f"lokr_{n}_a", f"lokr_{n}_b"} <= set(t)]
            dim = next((t[f"lokr_{n}_b"].shape[0] for n in ("w2", "w1") if f"lokr_{n}_b" in t), None)
            scale = alpha / dim if alpha is not None and dim else 1.0  # LyCORIS / ComfyUI's rule
        else:
            missing = [r for r in ("A", "B") if r not in t] + ([] if "magnitude" in t or "dora_scale" in t
                                                              else ["magnitude"])
            scale = alpha / t["A"].shape[0] if alpha is not None and "A" in t else 1.0
        if missing:
            raise LoraError(f"{source}: {name} has no {', '.join(missing)} weight; the file is incomplete")
        if native:  # this project's files: peft's alpha / rank, as trained
            scale = native_scale
        dora = None
        if kind == "dora":
            dora = "peft" if "magnitude" in t else ("comfy_in" if t["dora_scale"].shape[0] == 1
                                                    and t["dora_scale"].ndim == 2 else "comfy_out")
        modules[name] = Adapter(kind, t, scale, dora)
    return modules, metadata


# ---- base weights and fusing -----------------------------------------------------------------------------------

def base_weight_getter(model):
    """module name in either layout -> that module's base weight in `model` (a row block of to_qkv for a q/k/v
    name on the merged DiT, the three stacked for to_qkv on the standard DiT)."""
    from diffsynth.lora.fuse import linear_layers

    layers = linear_layers(model)

    def get(name):
        parent, _, leaf = name.rpartition(".")
        if name in layers:
            return layers[name].weight.detach()
        if leaf in PART_OF and f"{parent}.{PART_OF[leaf][0]}" in layers:
            merged, i = PART_OF[leaf]
            w = layers[f"{parent}.{merged}"].weight.detach()
            d = w.shape[0] // 3
            return w[i * d:(i + 1) * d]
        if leaf in MERGED_PARTS and all(f"{parent}.{p}" in layers for p in MERGED_PARTS[leaf]):
            return torch.cat([layers[f"{parent}.{p}"].weight.detach() for p in MERGED_PARTS[leaf]])
        raise LoraError(f"adapter module {name} matches no linear layer of the model (directly or through "
                        "to_qkv/add_qkv_proj)")

    return get


@torch.no_grad()
def fuse_adapters(model, lora, scale: float = 1.0, keep_original: bool = False) -> list[str]:
    """W += scale * delta for every module of a LoHa / LoKr / DoRA, in either DiT layout; every module must fit
    before anything changes. Returns the changed layers."""
    from diffsynth.lora.fuse import _ORIGINAL, linear_layers

    modules, _ = read_adapters(lora)
    layers, base = linear_layers(model), base_weight_getter(model)
    plan, misfits = [], []
    for name, adapter in modules.items():
        w = base(name)
        if tuple(w.shape) != tuple(adapter.shape()):
            misfits.append(f"{name}: adapter {tuple(adapter.shape())} vs weight {tuple(w.shape)}")
            continue
        parent, _, leaf = name.rpartition(".")
        if name in layers:
            targets = [(layers[name], slice(None))]
        elif leaf in PART_OF:  # a q/k/v adapter -> its row block of to_qkv / add_qkv_proj
            merged, i = PART_OF[leaf]
            d = w.shape[0]
            targets = [(layers[f"{parent}.{merged}"], slice(i * d, (i + 1) * d))]
        else:  # a to_qkv adapter -> its row blocks over to_q, to_k, to_v
            targets = [(layers[f"{parent}.{p}"], slice(None)) for p in MERGED_PARTS[leaf]]
        plan.append((name, adapter, targets))
    if misfits:
        raise LoraError(f"adapter shapes do not fit the model (another model size?): {'; '.join(misfits[:8])}")
    changed = []
    for name, adapter, targets in plan:
        delta = adapter.delta(base(name)) * scale
        row = 0
        for linear, rows in targets:
            if keep_original and not hasattr(linear, _ORIGINAL):
                setattr(linear, _ORIGINAL, linear.weight.detach().to("cpu", copy=True))
            view = linear.weight[rows]
            part = delta[row:row + view.shape[0]]
            row += view.shape[0]
            view.copy_((view.float() + part.to(view.device)).to(view.dtype))
            changed.append(name)
    return list(dict.fromkeys(changed))


# ---- native files and the trainer ------------------------------------------------------------------------------

def save_adapter(sd, path, lora_type, rank, alpha, target_modules, architecture, extra_metadata=None):
    """A native LoHa / LoKr / DoRA file: peft's keys without the adapter name, rank, alpha, lora_type; LoHa and
    LoKr modules also get `<module>.alpha` tensors, the scale readers of tensors alone (ComfyUI, LyCORIS) take."""
    if lora_type not in LORA_TYPES[1:]:
        raise ValueError(f"lora_type must be one of {LORA_TYPES[1:]}, got {lora_type!r}")
    metadata = lora_metadata({}, architecture, rank, alpha, target_modules, {"lora_type": lora_type,
                                                                           **(extra_metadata or {})})
    sd = {k: v.contiguous() for k, v in sd.items()}
    sd.update(_alphas(sd, lora_type, rank, alpha))
    save_safetensors(sd, path, metadata)


def _alphas(sd, lora_type, rank, alpha) -> dict[str, torch.Tensor]:
    """`<module>.alpha` tensors for which ComfyUI's / LyCORIS' alpha / (rows of the decomposed factor: hada_w1_b,
    lokr_w2_b else lokr_w1_b, each `rank` rows in peft) is peft's alpha / rank. A LoKr module that peft keeps
    undecomposed (rank >= half its w2 factor) gets none: those readers apply it at scale 1, whatever alpha says.
    DoRA gets none: diffusers refuses a DoRA file with `.alpha` keys, and ComfyUI ignores its magnitude anyway."""
    if lora_type == "loha":
        stems = [k[: -len(".hada_w1_b")] for k in sd if k.endswith(".hada_w1_b")]
    elif lora_type == "lokr":
        stems = {k.rsplit(".", 1)[0] for k in sd if k.endswith((".lokr_w1_b", ".lokr_w2_b"))}
    else:
        return {}
    return {f"{stem}.alpha": torch.tensor(float(alpha) * _decomposed_rank(sd, stem) / rank) for stem in stems}


def _decomposed_rank(sd, stem):
    for key in (f"{stem}.hada_w1_b", f"{stem}.lokr_w2_b", f"{stem}.lokr_w1_b"):
        if key in sd:
            return sd[key].shape[0]


@torch.no_grad()
def load_adapter_weights(model, path, adapter_name="default") -> list[str]:
    """A native adapter file of the same type, targets, rank and layout back into the model's peft adapters
    (--lora_checkpoint); anything that does not match is an error before anything changes."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    sd = {k: v for k, v in load_safetensors(path).items() if not k.endswith(".alpha")}  # the scale is the config's
    have = get_peft_model_state_dict(model, adapter_name=adapter_name)
    extra, missing = sorted(set(sd) - set(have)), sorted(set(have) - set(sd))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(have[k].shape)}" for k in set(sd) & set(have)
              if sd[k].shape != have[k].shape]
    if extra or missing or shapes:
        raise LoraError(f"{path} does not match the model's adapters ({len(extra)} unexpected, e.g. "
                        f"{', '.join(extra[:3]) or '-'}; {len(missing)} missing, e.g. {', '.join(missing[:3]) or '-'}; "
                        f"{'; '.join(shapes[:3]) or 'no shape differences'}): continue with the --lora_type, "
                        "--lora_rank and --lora_target_modules it was trained with, on the same DiT layout")
    set_peft_model_state_dict(model, sd, adapter_name=adapter_name)
    return sorted(sd)


# ---- conversion and export ------------------------------------------------------------------------------------

def to_standard(modules: dict[str, Adapter]) -> dict[str, Adapter]:
    out = {}
    for name, adapter in modules.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in MERGED_PARTS:
            for part, piece in zip(MERGED_PARTS[leaf], adapter.split_rows(3, name)):
                out[f"{parent}.{part}"] = piece
        else:
            out[name] = adapter
    return out


FORMATS_BY_TYPE = {"loha": ("native", "comfyui", "kohya"), "lokr": ("native", "comfyui", "kohya"),
                   "dora": ("native", "comfyui", "kohya", "diffusers")}


def to_format(modules: dict[str, Adapter], fmt: str, base=None) -> dict[str, torch.Tensor]:
    """Adapters -> a state dict in key format `fmt`, the scale folded into the weights (so alpha = rank / scale
    1 for every reader). DoRA to comfyui / kohya needs `base` (module -> base weight), see the module docstring."""
    kind = next(iter(modules.values())).kind
    if fmt not in FORMATS_BY_TYPE[kind]:
        raise LoraError(
            f"a {kind.upper() if kind != 'dora' else 'DoRA'} cannot be written in the {fmt} format: "
            + {"diffusers": "diffusers loads LoRA and DoRA only", "diffsynth": "DiffSynth-Studio's loader reads "
               "lora_A/lora_B only and would drop the rest silently"}.get(fmt, f"{fmt} has no keys for it")
            + f"; use one of {', '.join(FORMATS_BY_TYPE[kind])}")
    out = {}
    for name, a in modules.items():
        t = {k: v.float() for k, v in a.t.items()}
        if fmt == "native":
            stem = name
            if kind == "dora":
                out.update({f"{stem}.lora_A.weight": t["A"], f"{stem}.lora_B.weight": t["B"] * a.scale})
                out[f"{stem}.lora_magnitude_vector"] = _peft_magnitude(a, base, name)
            else:
                first = "hada_w1_a" if kind == "loha" else ("lokr_w1" if "lokr_w1" in t else "lokr_w1_a")
                out.update({f"{stem}.{k}": (v * a.scale if k == first else v) for k, v in t.items()})
            continue
        stem = {"comfyui": f"diffusion_model.{name}", "kohya": f"lora_unet_{name.replace('.', '_')}",
                "diffusers": f"transformer.{name}"}[fmt]
        if kind == "loha":
            out.update({f"{stem}.{k}": (v * a.scale if k == "hada_w1_a" else v) for k, v in t.items()})
            out[f"{stem}.alpha"] = torch.tensor(float(t["hada_w1_b"].shape[0]))
        elif kind == "lokr":
            first = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
            out.update({f"{stem}.{k}": (v * a.scale if k == first else v) for k, v in t.items()})
            dim = next((t[f"lokr_{n}_b"].shape[0] for n in ("w2", "w1") if f"lokr_{n}_b" in t), None)
            if dim:  # ComfyUI divides alpha by this rank; without a decomposed factor it applies no scale
                out[f"{stem}.alpha"] = torch.tensor(float(dim))
        elif fmt == "diffusers":
            out.update({f"{stem}.lora_A.weight": t["A"], f"{stem}.lora_B.weight": t["B"] * a.scale,
                        f"{stem}.lora_magnitude_vector": _peft_magnitude(a, base, name)})
        else:
            if a.dora == "comfy_in":
                d = t["dora_scale"]
            else:
                if base is None:
                    raise LoraError(
                        "a DoRA for ComfyUI needs the base model's weights (ComfyUI normalises an output-axis "
                        "dora_scale by the base weight's row norms, so the file is computed from them): export it "
                        "from the trainer (--export_format comfyui), which has the DiT loaded")
                w = base(name).float()
                v = w + (t["B"] @ t["A"]) * a.scale
                m = _peft_magnitude(a, base, name)
                d = (m[:, None] * (w.norm(dim=1, keepdim=True) + _EPS) / v.norm(dim=1, keepdim=True))
            out.update({f"{stem}.lora_down.weight": t["A"], f"{stem}.lora_up.weight": t["B"] * a.scale,
                        f"{stem}.alpha": torch.tensor(float(t["A"].shape[0])), f"{stem}.dora_scale": d})
    return {k: v.clone() for k, v in out.items()}  # split parts share A: safetensors wants separate tensors


def _peft_magnitude(a: Adapter, base, name):
    """peft's magnitude vector of a DoRA (its own, or the one a ComfyUI dora_scale amounts to for the base)."""
    if a.dora == "peft":
        return a.t["magnitude"].float()
    if a.dora == "comfy_in" or base is None:
        raise LoraError(f"{name}: a ComfyUI {'input-axis ' if a.dora == 'comfy_in' else ''}DoRA "
                        + ("has no per-row magnitude" if a.dora == "comfy_in" else "needs the base weights")
                        + " for this format")
    w = base(name).float()
    v = w + (a.t["B"].float() @ a.t["A"].float()) * a.scale
    return a.t["dora_scale"].float().reshape(-1) * v.norm(dim=1) / (w.norm(dim=1) + _EPS)


def convert_adapter_file(input, output, direction, format=None, rank=None, base_weights=None) -> list[str]:
    """convert_lora_file for LoHa / LoKr / DoRA files (it dispatches here): to_standard only (see the module
    docstring for what is exact), into native, comfyui, kohya or (DoRA) diffusers keys."""
    input = os.fspath(input)
    if direction != "to_standard" or rank is not None:
        raise LoraError(f"{input}: LoHa, LoKr and DoRA files convert --direction to_standard only (without --rank); "
                        "they load into either DiT of this project as they are")
    modules, metadata = read_adapters(input)
    kind = next(iter(modules.values())).kind
    fmt = format or ("diffusers" if kind == "dora" else "comfyui")
    report = [f"{input}: {kind}, {len(modules)} modules"]
    converted = to_standard(modules)
    sd = to_format(converted, fmt, base_weights)
    # written in the input's weight dtype (a bf16 file stays bf16, as convert_lora_file keeps it); a DoRA's magnitude
    # or dora_scale stays fp32 (the norm of a base weight row: its rounding would outweigh what training learned)
    dtype = next((v.dtype for a in modules.values() for k, v in a.t.items() if k not in ("magnitude", "dora_scale")
                  and v.is_floating_point()), torch.float32)
    sd = {k: v if k.endswith(KEEP_FP32) or not v.is_floating_point() else v.to(dtype) for k, v in sd.items()}
    targets = sorted({short_name(n) for n in converted})
    rank_value = int(metadata.get("rank", 1))  # the scale is folded into the weights: alpha = rank
    meta = lora_metadata({}, "standard", rank_value, rank_value, targets, {
        **carried_metadata(input), "lora_type": kind, "converted_from": os.path.basename(input),
        "direction": direction, "key_format": fmt})
    save_safetensors(sd, output, meta)
    report.append(f"wrote {output}: {fmt} format, standard layout, {len(converted)} modules")
    return report
