"""Fuse a LoRA of any format into the weights of either DiT layout, and undo it.

A standard LoRA's q/k/v deltas land in their row slice of `to_qkv` / `add_qkv_proj`; a merged LoRA's delta
is split by rows over `to_q/to_k/to_v`. Every LoRA module must find its target and fit it, or nothing is changed.
"""
import torch
from torch import nn

from diffsynth.lora.reader import MERGED_PARTS, PART_OF, LoraError, lora_modules

_ORIGINAL = "_lora_fuse_original"  # attribute holding a CPU copy of a weight before its first kept fuse


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


def _plan(model, lora):
    """[(name, linear, rows or None, A, B)] for every LoRA module, or an error naming every misfit.

    Deltas are formed one at a time when applied: all of a full-model LoRA's deltas at once would be the size
    of the model in fp32.
    """
    layers = linear_layers(model)
    plan, unmatched, misfits = [], [], []
    for name, (A, B) in lora_modules(lora).items():
        parent, _, leaf = name.rpartition(".")
        if name in layers:
            targets = [(name, None, B)]
        elif leaf in PART_OF and f"{parent}.{PART_OF[leaf][0]}" in layers:  # q/k/v delta -> rows of to_qkv
            merged, i = PART_OF[leaf]
            d, target = B.shape[0], f"{parent}.{PART_OF[leaf][0]}"
            if layers[target].out_features != 3 * d:
                misfits.append(f"{name} ({d} rows) into a third of {target} ({layers[target].out_features} rows)")
                continue
            targets = [(target, slice(i * d, (i + 1) * d), B)]
        elif leaf in MERGED_PARTS and all(f"{parent}.{p}" in layers for p in MERGED_PARTS[leaf]):
            d = B.shape[0] // 3  # merged delta -> row thirds over to_q/to_k/to_v
            targets = [(f"{parent}.{p}", None, B[i * d:(i + 1) * d]) for i, p in enumerate(MERGED_PARTS[leaf])]
        else:
            unmatched.append(name)
            continue
        for target, rows, B_part in targets:
            weight = layers[target].weight
            expected = tuple(weight.shape if rows is None else weight[rows].shape)
            if (B_part.shape[0], A.shape[1]) != expected:
                misfits.append(f"{name} delta {(B_part.shape[0], A.shape[1])} vs {target}.weight {expected}")
            else:
                plan.append((target, layers[target], rows, A, B_part))
    if unmatched:
        raise LoraError(f"{len(unmatched)} LoRA modules match no linear layer of the model (neither directly nor "
                        f"through to_qkv/add_qkv_proj): {', '.join(unmatched)}")
    if misfits:
        raise LoraError(f"LoRA shapes do not fit the model (a LoRA for another model size?): {'; '.join(misfits)}")
    return plan


@torch.no_grad()
def fuse_lora(model: nn.Module, lora, scale: float = 1.0, keep_original: bool = False) -> list[str]:
    """W += scale * B @ A for every module of `lora` (path or state dict, any format); returns the changed layers.

    The delta is computed in fp32 and the sum cast back to the weight's dtype. With keep_original=True each
    changed weight is first copied to CPU (once, before its first kept fuse) so that unfuse_lora(model) can restore
    it bit-exactly; this costs one CPU copy of every changed weight.
    """
    from diffsynth.lora.adapters import adapter_type, fuse_adapters

    if adapter_type(lora) != "lora":  # LoHa, LoKr, DoRA
        return fuse_adapters(model, lora, scale, keep_original)
    plan = _plan(model, lora)
    for _, linear, rows, A, B in plan:
        weight = linear.weight
        delta = (B.to(weight.device, torch.float32) @ A.to(weight.device, torch.float32)) * scale
        if keep_original and not hasattr(linear, _ORIGINAL):
            setattr(linear, _ORIGINAL, weight.detach().to("cpu", copy=True))
        view = weight if rows is None else weight[rows]
        view.copy_((view.float() + delta).to(weight.dtype))
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
    for name, linear in linear_layers(model).items():
        original = getattr(linear, _ORIGINAL, None)
        if original is not None:
            linear.weight.copy_(original)
            delattr(linear, _ORIGINAL)
            restored.append(name)
    if not restored:
        raise LoraError("unfuse_lora(model) without a LoRA restores weights kept by fuse_lora(..., keep_original=True),"
                        " but no layer of this model holds one; pass the fused LoRA to subtract it instead")
    return restored
