"""`make demo`: the whole job end to end on CPU with no download.

Writes the tiny random model set and a synthetic edit dataset (a red square that the target shows blue), trains a
merged-QKV LoRA with `accelerate launch train_merged_qkv.py` (which also writes the standard-layout copy
`checkpoint-final-standard.safetensors`), converts it once more with the conversion script (ComfyUI keys), and edits a
held-out image with the inference script on the STANDARD DiT carrying the standard copy. Leaves loss.png, the
checkpoints and the edited images in the output folder; a rerun replaces them (--overwrite).

    python -m diffsynth.utils.demo --output demo_output
"""
import argparse
import os
import subprocess
import sys
import time

from diffsynth.utils.cli import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "examples/qwen_image/model_training/train_merged_qkv.py")
CONVERT = os.path.join(ROOT, "examples/qwen_image/model_training/utils/convert_merged_qkv_checkpoint.py")
INFER = os.path.join(ROOT, "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")
TINY_MODELS = ("tiny-random/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,"
               "tiny-random/Qwen-Image:text_encoder/model*.safetensors,"
               "tiny-random/Qwen-Image:vae/diffusion_pytorch_model.safetensors")
PROMPT = "make the red square blue"
SIZE = 128  # px; the tiny models are fast enough on two CPU cores at this size
EDIT_AREA = SIZE * SIZE


def run(title, cmd):
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"=== {title}: done in {time.time() - start:.0f} s", flush=True)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output)
    models, data, lora_dir = os.path.join(out, "models"), os.path.join(out, "data"), os.path.join(out, "lora")

    from diffsynth.utils.demo_data import draw_scene, COLOURS, write_edit_dataset
    from diffsynth.utils.tiny_models import write_tiny_models

    if not os.path.isdir(os.path.join(models, "tiny-random")):
        write_tiny_models(models, seed=0)
    write_edit_dataset(data, num_samples=8, size=(SIZE, SIZE))
    held_out = os.path.join(out, "input.png")
    draw_scene((SIZE, SIZE), (30, 40, 90, 100), COLOURS["red"], (200, 200, 200)).save(held_out)
    print(f"tiny models in {models}\nsynthetic dataset in {data}")

    python = sys.executable
    run("train a merged-QKV LoRA (accelerate launch, CPU)", [
        python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN,
        "--dataset_base_path", data, "--dataset_metadata_path", os.path.join(data, "metadata.csv"),
        "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image",
        "--max_pixels", str(SIZE * SIZE), "--edit_image_area", str(EDIT_AREA),
        "--model_id_with_origin_paths", TINY_MODELS, "--models_dir", models,
        "--learning_rate", "1e-2", "--max_steps", str(args.steps),
        "--batch_size", "4", "--cache_conditioning", "--output_path", lora_dir,
        "--lora_base_model", "dit", "--lora_rank", "16", "--save_steps", str(max(1, args.steps // 2)),
        "--overwrite",
    ])
    merged_lora = os.path.join(lora_dir, "checkpoint-final.safetensors")
    standard_lora = os.path.join(lora_dir, "checkpoint-final-standard.safetensors")  # written by the trainer
    run("convert the LoRA to the standard layout with ComfyUI keys (the conversion script)", [
        python, CONVERT, "--input", merged_lora, "--output", os.path.join(lora_dir, "checkpoint-final-comfyui.safetensors"),
        "--direction", "to_standard", "--format", "comfyui",
    ])
    common = ["--edit_image", held_out, "--prompt", PROMPT, "--models_dir", models,
              "--model_id_with_origin_paths", TINY_MODELS, "--num_steps", "20", "--edit_image_area", str(EDIT_AREA),
              "--cfg_scale", "1", "--seed", "0"]
    run("edit with the merged DiT and the merged LoRA",
        [python, INFER, *common, "--lora_path", merged_lora, "--output", os.path.join(out, "edited_merged.png")])
    run("edit with the STANDARD DiT and the trainer's standard-layout copy",
        [python, INFER, *common, "--standard", "--lora_path", standard_lora,
         "--output", os.path.join(out, "edited_standard.png")])
    run("edit without a LoRA (for comparison)", [python, INFER, *common, "--output", os.path.join(out, "no_lora.png")])

    import csv

    with open(os.path.join(lora_dir, "train_log.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    k = max(1, len(losses) // 5)
    print(f"\nmean loss over the first {k} steps {sum(losses[:k]) / k:.4f}, over the last {k} "
          f"{sum(losses[-k:]) / k:.4f}")
    print("The tiny models are random, so the images are noise: the demo shows the machinery (training, exact "
          "conversion, inference on either DiT), not image quality.")

    from PIL import Image, ImageChops

    a = Image.open(os.path.join(out, "edited_merged.png"))
    b = Image.open(os.path.join(out, "edited_standard.png"))
    diff = max(hi for _, hi in ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema())
    print(f"\nmerged DiT + merged LoRA vs standard DiT + standard copy: largest pixel difference {diff}/255")
    print(f"\nDone. Look at:\n  {os.path.join(lora_dir, 'loss.png')}\n  {held_out} (input)\n"
          f"  {os.path.join(out, 'edited_merged.png')}\n  {os.path.join(out, 'edited_standard.png')}\n"
          f"  {os.path.join(out, 'no_lora.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
