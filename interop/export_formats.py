"""Write one merged-QKV LoRA in every format this project exports, at the real Qwen-Image width (one block), plus the
reference the consumers are compared with. Runs with THIS project's Python (its `diffsynth` on the path).

    PYTHONPATH=. .venv/bin/python interop/export_formats.py --out /tmp/interop

Writes <out>/<targets>/<file>.safetensors for three target sets ("quickstart": the quickstart's block modules;
"all": every linear layer of the DiT; "all_but_timestep": all but the timestep embedder), and <out>/<targets>/expected.safetensors: `<module>.A` / `<module>.B` in the
standard layout with the alpha/rank scale folded into B (this project's reading of the LoRA: delta W = B @ A).
"""
import argparse
import json
import os

import torch

from diffsynth.lora import convert_lora_file, lora_to_standard, save_lora
from diffsynth.lora.reader import lora_modules
from diffsynth.lora.reader import BLOCK_LINEARS, TOP_LINEARS  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
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


if __name__ == "__main__":
    main()
