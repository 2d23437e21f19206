"""Train-time LoRA: inject with peft, read out, save and reload native checkpoints."""
import re

import torch
from torch import nn

from diffsynth.lora.fuse import linear_layers
from diffsynth.lora.reader import ARCHITECTURES, LoraError, _read_raw, lora_metadata
from diffsynth.utils.io import save_safetensors

_QKV_HINTS = {  # separate q/k/v target -> the merged layer that replaces it (and _SPLIT_HINTS the other way)
    **{t: "to_qkv" for t in ("to_q", "to_k", "to_v", "attn.to_q", "attn.to_k", "attn.to_v")},
    **{t: "add_qkv_proj" for t in ("add_q_proj", "add_k_proj", "add_v_proj",
                                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
}
_SPLIT_HINTS = {"to_qkv": "to_q,to_k,to_v", "attn.to_qkv": "to_q,to_k,to_v",
                "add_qkv_proj": "add_q_proj,add_k_proj,add_v_proj",
                "attn.add_qkv_proj": "add_q_proj,add_k_proj,add_v_proj"}


def parse_target_modules(target_modules) -> list[str]:
    """"to_qkv, to_out.0" or a list -> ["to_qkv", "to_out.0"] (a string is a comma list, as on the command line)."""
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    targets = [t.strip() for t in target_modules if t.strip()]
    if not targets:
        raise ValueError("no LoRA target modules given")
    return targets


def matches_target(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def _not_found_message(missing, names) -> str:
    short = list(dict.fromkeys(re.sub(r"^.*?\.\d+\.", "", n) for n in names))
    message = (f"Module {', '.join(missing)} not found in LoRA target modules: no nn.Linear of the model "
               f"matches {'it' if len(missing) == 1 else 'them'}. The model's linear layers are: {', '.join(short)}.")
    fixes = []
    for target in missing:
        merged, split = _QKV_HINTS.get(target), _SPLIT_HINTS.get(target)
        if merged and any(matches_target(n, merged) for n in names):
            fixes.append(f"{target} -> {merged}")
        elif split and any(matches_target(n, split.split(",")[0]) for n in names):
            fixes.append(f"{target} -> {split}")
    if fixes:
        message += (" This model's q/k/v projections are laid out differently (merged QKV: to_qkv / add_qkv_proj;"
                    f" standard: to_q,to_k,to_v / add_q_proj,...): use {'; '.join(dict.fromkeys(fixes))} in "
                    "--lora_target_modules.")
    return message


def check_target_modules(target_modules, names) -> list[str]:
    """The targets, each matching at least one of the linear layers `names`; a ValueError naming the fix otherwise
    (before any model changes: the trainer checks them against the DiT's file headers before it loads)."""
    targets = parse_target_modules(target_modules)
    missing = [t for t in targets if not any(matches_target(n, t) for n in names)]
    if missing:
        raise ValueError(_not_found_message(missing, names))
    return targets


def inject_lora(model: nn.Module, target_modules, rank: int, alpha: float | None = None,
                adapter_name: str = "default", lora_type: str = "lora", network_dropout: float = 0.0) -> nn.Module:
    """Add LoRA adapters (peft; plain LoRA layers get the forward of `fused_linear.py`) to the linear layers named
    by `target_modules`; only LoRA weights stay trainable.
    `lora_type` loha, lokr or dora injects peft's LoHa, LoKr or DoRA instead (scale alpha / rank for all).

    Targets match like peft matches a list of names: a module whose path equals a target or ends with
    "." + target. Every target must match at least one nn.Linear, checked before anything is changed.
    `network_dropout`: dropout on the LoRA's rank activations in training (kohya's / musubi-tuner's; fused_linear.py),
    plain LoRA only.
    """
    if network_dropout and lora_type != "lora":
        raise ValueError(f"network dropout is implemented for lora_type lora only, not {lora_type}")
    targets = check_target_modules(target_modules, list(linear_layers(model)))
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    alpha = rank if alpha is None else alpha
    config = {"lora": lambda: LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets),
              "dora": lambda: LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=True),
              "loha": lambda: LoHaConfig(r=rank, alpha=alpha, target_modules=targets),
              "lokr": lambda: LoKrConfig(r=rank, alpha=alpha, target_modules=targets)}[lora_type]()
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    from .fused_linear import fuse_lora_forward

    fuse_lora_forward(model, network_dropout)  # a forward that makes fewer passes over the activations
    for name, param in model.named_parameters():
        adapter = f".{adapter_name}." in name or name.endswith(f".{adapter_name}")  # LoHa/LoKr: ParameterDicts
        param.requires_grad_(adapter and any(p in name for p in (".lora_", ".hada_", ".lokr_")))
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default", state_dict=None) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` with native keys: `transformer_blocks.0.attn.to_qkv.lora_A.weight`.

    `state_dict`: the model's full state dict when it must be gathered first (FSDP: accelerator.get_state_dict).
    """
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    if not sd:
        raise LoraError(f"the model holds no LoRA adapter {adapter_name!r}; call inject_lora first")
    return sd


def save_lora(model_or_state_dict, path, rank: int, alpha: float, target_modules, architecture: str,
              extra_metadata: dict | None = None):
    """Write a native LoRA checkpoint atomically: `<module>.lora_A.weight` / `.lora_B.weight` as trained and
    `<module>.alpha` tensors (what other tools read), with rank, alpha, targets, architecture and format version
    also in the metadata."""
    sd = model_or_state_dict
    if isinstance(sd, nn.Module):
        sd = lora_state_dict(sd)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    bad = [k for k in sd if not k.endswith((".lora_A.weight", ".lora_B.weight")) or ".default." in k]
    if bad:
        raise ValueError(f"save_lora takes native keys (<module>.lora_A.weight / .lora_B.weight); got {bad[:5]}")
    metadata = lora_metadata(sd, architecture, rank, alpha, parse_target_modules(target_modules), extra_metadata)
    alphas = {k[: -len("lora_A.weight")] + "alpha": torch.tensor(float(alpha))
              for k in sd if k.endswith(".lora_A.weight")}
    save_safetensors({**sd, **alphas}, path, metadata)


def _lora_layers(model, adapter_name):
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


@torch.no_grad()
def load_lora_weights(model: nn.Module, lora, adapter_name: str = "default") -> list[str]:
    """Load a LoRA (path or state dict, any format) into the adapters inject_lora made, e.g. to resume training.

    Every LoRA module must exist in the model and every model adapter must be in the LoRA, with equal shapes.
    When the file's alpha/rank scale differs from the model's, B is rescaled so the delta is the file's; with equal
    scales the weights are copied unchanged.
    """
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise LoraError(f"the model holds no LoRA adapter {adapter_name!r}; call inject_lora before load_lora_weights")
    modules, scales, diffs, _ = _read_raw(lora)
    if diffs:
        raise LoraError(f"the LoRA holds full or bias deltas (.diff / .diff_b, e.g. {next(iter(diffs))}), which have no "
                        "place in LoRA adapters, so training cannot continue from it; fuse it into the DiT instead "
                        "(--lora_fused) and train a new LoRA on top")
    unexpected = sorted(set(modules) - set(layers))
    missing = sorted(set(layers) - set(modules))
    if unexpected or missing:
        raise LoraError(
            f"the LoRA does not match the model's adapters: {len(unexpected)} LoRA modules have no adapter in the model"
            f" ({', '.join(unexpected[:8])}), {len(missing)} adapters are missing from the LoRA "
            f"({', '.join(missing[:8])}). Inject the same --lora_target_modules, or convert the LoRA to this DiT's "
            "layout (convert_merged_qkv_checkpoint.py --direction to_merged|to_standard).")
    mismatched = []
    for name, (A, B) in modules.items():
        a, b = layers[name].lora_A[adapter_name].weight, layers[name].lora_B[adapter_name].weight
        if A.shape != a.shape or B.shape != b.shape:
            mismatched.append(f"{name}: LoRA A{tuple(A.shape)} B{tuple(B.shape)} vs model A{tuple(a.shape)} "
                              f"B{tuple(b.shape)}")
    if mismatched:
        raise LoraError(f"LoRA shapes do not match the model's adapters (another rank or model?): "
                        f"{'; '.join(mismatched[:8])}")
    for name, (A, B) in modules.items():
        layer = layers[name]
        factor = scales[name] / layer.scaling[adapter_name]
        if factor != 1.0:
            B = B.float() * factor
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
    return sorted(modules)
