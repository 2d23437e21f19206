"""Fuse a LoRA of any format into the weights of either DiT layout, and undo it.

A standard LoRA's q/k/v deltas land in their row slice of `to_qkv` / `add_qkv_proj`; a merged LoRA's delta
is split by rows over `to_q/to_k/to_v`; bias deltas (`.diff_b`) and full deltas (`.diff`) alike. Every LoRA module
must find its target and fit it, or nothing is changed.
"""
import torch
from torch import nn

from diffsynth.lora.reader import MERGED_PARTS, PART_OF, LoraError, is_norm, lora_diffs, lora_modules, read_lora

_ORIGINAL = "_lora_fuse_original"  # attribute of a parameter: its CPU copy before its first kept fuse


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: nn.Linear}; a peft-wrapped layer is listed under its own name with its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft is slow to import: only when needed

    layers, wrapped = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # inside a peft layer: its base_layer and lora_A/lora_B
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, nn.Linear):
            layers[name] = module
    return layers


def _resolve(name, rows_of_delta, layers):
    """Where a delta of module `name` (`rows_of_delta` rows) lands: [(layer, rows of its weight or None, rows of
    the delta or None)], a misfit text, or None when no layer matches (directly or through the other layout)."""
    parent, _, leaf = name.rpartition(".")
    if name in layers:
        return [(name, None, None)]
    if leaf in PART_OF and f"{parent}.{PART_OF[leaf][0]}" in layers:  # q/k/v delta -> rows of to_qkv
        merged, i = PART_OF[leaf]
        d, target = rows_of_delta, f"{parent}.{merged}"
        if layers[target].out_features != 3 * d:
            return f"{name} ({d} rows) into a third of {target} ({layers[target].out_features} rows)"
        return [(target, slice(i * d, (i + 1) * d), None)]
    if leaf in MERGED_PARTS and all(f"{parent}.{p}" in layers for p in MERGED_PARTS[leaf]):
        d = rows_of_delta // 3  # merged delta -> row thirds over to_q/to_k/to_v
        return [(f"{parent}.{p}", None, slice(i * d, (i + 1) * d)) for i, p in enumerate(MERGED_PARTS[leaf])]
    return None


def _plan(model, lora):
    """[(layer name, parameter, rows or None, (A, B) or a full delta)] for every LoRA part, or an error naming every
    misfit. Low-rank deltas are formed one at a time when applied: all of a full-model LoRA's deltas at once would
    be the size of the model in fp32."""
    layers = linear_layers(model)
    params = dict(model.named_parameters())
    sd = read_lora(lora)
    parts = [(name, "weight", (A, B), B.shape[0]) for name, (A, B) in lora_modules(sd).items()]
    for name, entry in lora_diffs(sd).items():
        if "diff" in entry:
            parts.append((name, "weight", entry["diff"], entry["diff"].shape[0]))
        if "diff_b" in entry:
            parts.append((name, "bias", entry["diff_b"], entry["diff_b"].shape[0]))
    plan, unmatched, misfits = [], [], []
    for name, what, delta, rows_of_delta in parts:
        if is_norm(name):  # a 1-D weight, same name in both layouts
            param = params.get(f"{name}.weight")
            if param is None:
                unmatched.append(name)
            elif param.shape != delta.shape:
                misfits.append(f"{name}.diff {tuple(delta.shape)} vs {name}.weight {tuple(param.shape)}")
            else:
                plan.append((name, param, None, delta))
            continue
        targets = _resolve(name, rows_of_delta, layers)
        if targets is None:
            unmatched.append(name)
            continue
        if isinstance(targets, str):
            misfits.append(targets)
            continue
        for target, rows, delta_rows in targets:
            param = getattr(layers[target], what)
            if param is None:
                misfits.append(f"{name}.diff_b: {target} has no bias")
                continue
            if isinstance(delta, tuple):
                A, B = delta
                part = (A, B if delta_rows is None else B[delta_rows])
                shape = (part[1].shape[0], A.shape[1])
            else:
                part = delta if delta_rows is None else delta[delta_rows]
                shape = tuple(part.shape)
            expected = tuple(param.shape if rows is None else param[rows].shape)
            if shape != expected:
                label = "bias delta" if what == "bias" else "delta" if isinstance(delta, tuple) else "full delta"
                misfits.append(f"{name} {label} {shape} vs {target}.{what} {expected}")
            else:
                plan.append((target, param, rows, part))
    if unmatched:
        unmatched = list(dict.fromkeys(unmatched))
        raise LoraError(f"{len(unmatched)} LoRA modules match no layer of the model (neither directly nor "
                        f"through to_qkv/add_qkv_proj): {', '.join(unmatched)}")
    if misfits:
        raise LoraError(f"LoRA shapes do not fit the model (a LoRA for another model size?): {'; '.join(misfits)}")
    return plan


@torch.no_grad()
def fuse_lora(model: nn.Module, lora, scale: float = 1.0, keep_original: bool = False) -> list[str]:
    """W += scale * B @ A (and b += scale * diff_b, W += scale * diff) for every module of `lora` (path or state dict,
    any format); returns the changed layers.

    The delta is computed in fp32 and the sum cast back to the parameter's dtype. With keep_original=True each
    changed parameter is first copied to CPU (once, before its first kept fuse) so that unfuse_lora(model) can
    restore it bit-exactly; this costs one CPU copy of every changed parameter.
    """
    from diffsynth.lora.adapters import adapter_type, fuse_adapters

    if adapter_type(lora) != "lora":  # LoHa, LoKr, DoRA
        return fuse_adapters(model, lora, scale, keep_original)
    plan = _plan(model, lora)
    for _, param, rows, delta in plan:
        if isinstance(delta, tuple):
            A, B = delta
            delta = B.to(param.device, torch.float32) @ A.to(param.device, torch.float32)
        delta = delta.to(param.device, torch.float32) * scale
        if keep_original and not hasattr(param, _ORIGINAL):
            setattr(param, _ORIGINAL, param.detach().to("cpu", copy=True))
        view = param if rows is None else param[rows]
        view.copy_((view.float() + delta).to(param.dtype))
    return list(dict.fromkeys(name for name, *_ in plan))


@torch.no_grad()
def unfuse_lora(model: nn.Module, lora=None, scale: float = 1.0) -> list[str]:
    """Undo fuse_lora. Returns the changed layers.

    With `lora`: W -= scale * B @ A (the inverse of one fuse; exact up to one rounding of the weight dtype).
    Without: restore every weight saved by fuse_lora(..., keep_original=True) bit-exactly, undoing all LoRAs
    fused into it since.
    """
    if lora is not None:
        return fuse_lora(model, lora, -scale)
    restored = []
    for name, param in model.named_parameters():
        original = getattr(param, _ORIGINAL, None)
        if original is not None:
            param.copy_(original)
            delattr(param, _ORIGINAL)
            restored.append(name.rpartition(".")[0])
    if not restored:
        raise LoraError("unfuse_lora(model) without a LoRA restores weights kept by fuse_lora(..., keep_original=True),"
                        " but no layer of this model holds one; pass the fused LoRA to subtract it instead")
    return restored
