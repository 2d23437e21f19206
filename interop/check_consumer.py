"""Load every file export_formats.py wrote through a consumer's OWN loader and compare the weight deltas it applies
with this project's. Runs with the CONSUMER's Python (its own venv; this project is not imported):

    /work/venvs/diffsynth-upstream/bin/python interop/check_consumer.py diffsynth-studio /tmp/interop
    /work/venvs/dse/bin/python interop/check_consumer.py diffsynth-engine /tmp/interop

For each target set and file it prints one JSON line: how many of the expected modules the consumer changed exactly
(max |delta - expected| <= 1e-4 * max |expected|), which it left unchanged, which it changed wrongly, and any error.
The DiT is the consumer's own class with one block at the real width (3072), weights zero (only deltas matter).
"""
import json
import os
import sys
import traceback

import torch
from safetensors.torch import load_file

TOLERANCE = 1e-4


def diffsynth_studio():
    """DiffSynth-Studio 2.1.12: QwenImagePipeline.load_lora(module, path) -> GeneralLoRALoader (fuses)."""
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    with torch.device("meta"):
        dit = QwenImageDiT(num_layers=1)
    dit = dit.to_empty(device="cpu").float()
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = dit
    return dit, lambda path: pipe.load_lora(pipe.dit, path), {}, ()


def diffsynth_engine():
    """diffsynth-engine 0.7.0: QwenImagePipeline.load_loras([(path, scale)]) -> QwenImageLoRAConverter.convert ->
    QwenImageDiT.load_loras (fused). The pipeline object carries only the DiT (no text encoder / VAE needed), built
    under LoRAContext as QwenImagePipeline.from_pretrained builds it."""
    from types import SimpleNamespace

    from diffsynth_engine.models.basic.lora import LoRAContext
    from diffsynth_engine.models.qwen_image.qwen_image_dit import QwenImageDiT
    from diffsynth_engine.pipelines.qwen_image import QwenImagePipeline

    with LoRAContext():  # as its from_pretrained builds the DiT: linears that can take LoRAs
        dit = QwenImageDiT(device="meta", dtype=torch.float32, num_layers=1).to_empty(device="cpu")
    pipe = object.__new__(QwenImagePipeline)
    pipe.dit, pipe.device, pipe.dtype = dit, "cpu", torch.float32
    pipe.config = SimpleNamespace(tp_degree=None, use_fsdp=False)
    names = {"attn.to_out.0": "attn.to_out", "timestep_embedder.linear_1": "timestep_embedder.0",
             "timestep_embedder.linear_2": "timestep_embedder.2"}  # its module names where they differ
    # its AdaLayerNorm splits (shift, scale), diffusers' (scale, shift): its checkpoint loader swaps the halves of
    # norm_out.linear, so a correct delta there is ours with the halves swapped
    swapped = ("norm_out.linear",)
    return dit, lambda path: pipe.load_loras([(path, 1.0)]), names, swapped


CONSUMERS = {"diffsynth-studio": diffsynth_studio, "diffsynth-engine": diffsynth_engine}


def their_name(name, renames):
    for ours, theirs in renames.items():
        name = name.replace(ours, theirs)
    return name


def check(consumer, folder, path):
    dit, load, renames, swapped_halves = CONSUMERS[consumer]()
    with torch.no_grad():
        for p in dit.parameters():
            p.zero_()
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in expected})
    params = dict(dit.named_parameters())
    error = None
    try:
        load(path)
    except Exception as e:  # what the user would see
        error = f"{type(e).__name__}: {str(e)[:300]}"
    params = dict(dit.named_parameters())
    exact, unchanged, wrong, absent = [], [], [], []
    for name in modules:
        want = (expected[f"{name}.B"].double() @ expected[f"{name}.A"].double())
        ours = want
        if name in swapped_halves:
            want = torch.cat([want[want.shape[0] // 2:], want[:want.shape[0] // 2]])
        key = their_name(name, renames) + ".weight"
        if key not in params:
            absent.append(name)
            continue
        got = params[key].detach().double()
        if got.abs().max() == 0:
            unchanged.append(name)
        elif (got - want).abs().max() <= TOLERANCE * want.abs().max():
            exact.append(name)
        else:
            ratio = (got.abs().max() / want.abs().max()).item()
            how = "the halves in the wrong order" if (got - ours).abs().max() <= TOLERANCE * want.abs().max() \
                else f"max |delta| {ratio:.3g}x the expected"
            wrong.append(f"{name} ({how})")
    # parameters that changed although no expected module maps to them (e.g. a merged delta somewhere else)
    touched = {their_name(n, renames) + ".weight" for n in modules}
    stray = [k for k, p in params.items() if k not in touched and p.detach().abs().max() > 0]
    return {"exact": len(exact), "of": len(modules), "unchanged": unchanged, "wrong": wrong, "absent": absent,
            "stray": stray, "error": error}


def main():
    consumer, root = sys.argv[1], sys.argv[2]
    for label in sorted(os.listdir(root)):
        folder = os.path.join(root, label)
        with open(os.path.join(folder, "files.json")) as f:
            files = json.load(f)
        for name, file in files.items():
            try:
                result = check(consumer, folder, os.path.join(folder, file))
            except Exception:
                result = {"error": traceback.format_exc(limit=2)[-400:]}
            print(json.dumps({"consumer": consumer, "targets": label, "file": name, **result}), flush=True)


if __name__ == "__main__":
    main()
