"""Write one merged-QKV LoRA in every format this project exports, at the real Qwen-Image width (one block), plus the
reference the consumers are compared with. Runs with THIS project's Python (its `diffsynth` on the path).

    PYTHONPATH=. .venv/bin/python interop/export_formats.py --out /tmp/interop

Writes <out>/<targets>/<file>.safetensors for three target sets ("quickstart": the quickstart's block modules;
"all": every linear layer of the DiT; "all_but_timestep": all but the timestep embedder), and
<out>/<targets>/expected.safetensors: `<module>.A` / `<module>.B` in the standard layout with the alpha/rank scale
folded into B (this project's reading of the LoRA: delta W = B @ A).

With --adapters also <out>/loha, lokr, dora: a merged-layout LoHa / LoKr / DoRA on `to_qkv` and `to_out.0` (peft's
adapters, as `--lora_type` trains them), its exports, `base.safetensors` (the base weights `<module>.weight` the
consumer's DiT gets first: DoRA's delta depends on them) and `expected.safetensors` with `<module>.delta`, the full
weight delta this project applies (`Adapter.delta`).
"""
import argparse
import json
import os

import torch

from diffsynth.lora import convert_lora_file, lora_to_standard, save_lora
from diffsynth.lora.adapters import FORMATS_BY_TYPE, base_weight_getter, read_adapters, save_adapter, to_standard
from diffsynth.lora.fuse import linear_layers
from diffsynth.lora.inject import inject_lora, lora_state_dict
from diffsynth.lora.reader import lora_modules
from diffsynth.lora.reader import BLOCK_LINEARS, TOP_LINEARS  # noqa: E402
from diffsynth.models.qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV
from diffsynth.utils.io import save_safetensors

WIDTH, TEXT, LATENT, RANK, ALPHA = 3072, 3584, 64, 4, 8.0  # alpha != rank: a wrong scale shows
QUICKSTART = ("attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
              "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
IN_SIZES = {"img_in": LATENT, "txt_in": TEXT, "time_text_embed.timestep_embedder.linear_1": 256}
OUT_SIZES = {"proj_out": LATENT}


def merged_lora(targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for leaf, (o, i) in BLOCK_LINEARS.items():
        if leaf in targets and leaf not in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                            "attn.add_k_proj", "attn.add_v_proj"):
            shapes[f"transformer_blocks.0.{leaf}"] = (o * WIDTH, i * WIDTH)
    for name, (o, i) in TOP_LINEARS.items():
        if name in targets:
            shapes[name] = (OUT_SIZES.get(name, (o or 1) * WIDTH), IN_SIZES.get(name, (i or 1) * WIDTH))
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f ** 0.5
        sd[f"{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.05
    return sd


ADAPTER_TARGETS = ("attn.to_qkv", "attn.to_out.0")  # the merged split and a plain layer: full deltas are stored


@torch.no_grad()
def adapter_exports(folder, lora_type, seed=1):
    """A merged LoHa / LoKr / DoRA as the trainer writes it (peft's adapters on the target layers of the real
    one-block merged DiT, every factor random), the files the trainer and the conversion script make of it, the
    base weights and this project's deltas."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # only the target layers get memory: nothing else is read
        dit = QwenImageDiTMergedQKV(num_layers=1)
    for name, layer in linear_layers(dit).items():
        if name.endswith(ADAPTER_TARGETS):
            layer.to_empty(device="cpu")
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features ** 0.5)
            layer.bias.zero_()
    inject_lora(dit, ",".join(ADAPTER_TARGETS), RANK, ALPHA, lora_type=lora_type)
    for name, p in dit.named_parameters():
        if p.requires_grad:  # the adapter's own weights (peft starts them with a zero delta)
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else noise * 0.05)
    native = os.path.join(folder, "native_merged.safetensors")
    save_adapter(lora_state_dict(dit), native, lora_type, RANK, ALPHA, ",".join(ADAPTER_TARGETS), "merged_qkv")
    base = base_weight_getter(dit)
    files = {"native_merged": native}
    for fmt in FORMATS_BY_TYPE[lora_type]:  # the trainer's default copy (native keys), then --export_format
        name = "standard_copy" if fmt == "native" else fmt
        files[name] = path = os.path.join(folder, f"{name}.safetensors")
        convert_lora_file(native, path, "to_standard", format=fmt, base_weights=base)
    standard = to_standard(read_adapters(native)[0])
    # a standard-layout native file as train.py writes it (alpha != rank, the scale NOT folded in)
    keys = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    files["native_standard"] = os.path.join(folder, "native_standard.safetensors")
    save_adapter({f"{n}.{keys.get(role, role)}": t.clone() for n, a in standard.items() for role, t in a.t.items()},
                 files["native_standard"], lora_type, RANK, ALPHA, ",".join(ADAPTER_TARGETS), "standard")
    save_safetensors({f"{n}.weight": base(n).contiguous() for n in standard}, os.path.join(folder, "base.safetensors"))
    save_safetensors({f"{n}.delta": a.delta(base(n)).contiguous() for n, a in standard.items()},
                     os.path.join(folder, "expected.safetensors"))
    return files, len(standard)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--adapters", action="store_true", help="also LoHa, LoKr and DoRA (about 300 MB each)")
    args = parser.parse_args()
    every = tuple(l for l in BLOCK_LINEARS if l not in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                                         "attn.add_k_proj", "attn.add_v_proj")) + tuple(TOP_LINEARS)
    no_timestep = tuple(t for t in every if not t.startswith("time_text_embed"))
    for label, targets in (("quickstart", QUICKSTART), ("all", every), ("all_but_timestep", no_timestep)):
        folder = os.path.join(args.out, label)
        os.makedirs(folder, exist_ok=True)
        native = os.path.join(folder, "native_merged.safetensors")  # as train_merged_qkv.py writes checkpoint-final
        save_lora(merged_lora(targets), native, RANK, ALPHA, ",".join(targets), "merged_qkv")
        files = {"native_merged": native}
        # the trainer's default standard-layout copy, then every --export_format / --format
        for name, fmt in (("standard_copy", "native"), ("diffusers", "diffusers"), ("comfyui", "comfyui"),
                          ("kohya", "kohya"), ("diffsynth", "diffsynth")):
            files[name] = os.path.join(folder, f"{name}.safetensors")
            convert_lora_file(native, files[name], "to_standard", format=fmt)
        # a standard-layout native file with alpha != rank as train.py writes it (scale NOT folded into B)
        standard = lora_modules(lora_to_standard(native))
        unscaled = {}
        for name, (A, B) in standard.items():
            unscaled[f"{name}.lora_A.weight"] = A
            unscaled[f"{name}.lora_B.weight"] = (B * (RANK / ALPHA)).contiguous()
        files["native_standard"] = os.path.join(folder, "native_standard.safetensors")
        save_lora(unscaled, files["native_standard"], RANK, ALPHA, ",".join(targets), "standard")
        expected = {}
        for name, (A, B) in standard.items():
            expected[f"{name}.A"], expected[f"{name}.B"] = A, B
        save_safetensors(expected, os.path.join(folder, "expected.safetensors"))
        with open(os.path.join(folder, "files.json"), "w") as f:
            json.dump({k: os.path.basename(v) for k, v in files.items()}, f, indent=1)
        print(f"{folder}: {', '.join(sorted(files))} ({len(standard)} standard-layout modules)")
    for lora_type in FORMATS_BY_TYPE if args.adapters else ():
        folder = os.path.join(args.out, lora_type)
        os.makedirs(folder, exist_ok=True)
        files, modules = adapter_exports(folder, lora_type)
        with open(os.path.join(folder, "files.json"), "w") as f:
            json.dump({k: os.path.basename(v) for k, v in files.items()}, f, indent=1)
        print(f"{folder}: {', '.join(sorted(files))} ({modules} standard-layout modules)")


if __name__ == "__main__":
    main()
