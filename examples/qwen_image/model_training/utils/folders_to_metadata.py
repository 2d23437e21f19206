"""Write the trainer's metadata file from image folders laid out for musubi-tuner or ai-toolkit.

    python examples/qwen_image/model_training/utils/folders_to_metadata.py \\
        --images data/targets --control data/controls --output data/metadata.csv

--images: the targets (the pictures after the edit), each `name.png` with its caption `name.txt`. --control (repeat
it for several edit images per row, ai-toolkit's list of control_path folders): each folder holds `name.jpg` for
every target, or musubi-tuner's numbered `name_0.png`, `name_1.png`, ... for several. --musubi_config reads the
image_directory / control_directory / caption_extension / caption_directory of a musubi-tuner dataset TOML's
[[datasets]] instead; its training settings (resolution, batch_size, num_repeats, ...) are named in a note and
left to the trainer's flags, and any other key is refused. Paths in the output are relative to its folder: train
with --dataset_base_path <that folder>, as printed at the end. Every problem is listed before anything is written;
the file is written atomically and an existing one is replaced only with --overwrite.
"""
import argparse
import os
import shlex
import sys
from collections import Counter

from diffsynth.trainers.dataset import DatasetError
from diffsynth.trainers.folders import check_output, folders_to_rows, read_musubi_config, write_metadata
from diffsynth.utils.cli import ArgumentParser


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of target images and their caption files")
    parser.add_argument("--control", action="append", default=[],
                        help="folder of control (edit input) images; repeat for several per row, in order")
    parser.add_argument("--caption_extension", default=".txt", help="caption file ending (default .txt)")
    parser.add_argument("--musubi_config", help="a musubi-tuner dataset .toml, instead of --images/--control")
    parser.add_argument("--output", required=True, help="metadata file to write: .csv, .json or .jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.musubi_config and (args.images or args.control):
        parser.error("--musubi_config names the folders itself; leave out --images and --control")
    if not args.musubi_config and not (args.images and args.control):
        parser.error("give --images and at least one --control folder, or --musubi_config")
    try:
        check_output(args.output, args.overwrite)  # before the folders are read: a flag to fix first
        notes = []
        if args.musubi_config:
            datasets, notes = read_musubi_config(args.musubi_config)
        else:
            datasets = [{"images": args.images, "controls": args.control, "caption_extension": args.caption_extension}]
        rows = folders_to_rows(datasets, args.output)
        write_metadata(rows, args.output, args.overwrite)
    except (DatasetError, OSError) as e:  # bad folders and files: listed, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    counts = Counter(len(r["edit_image"]) for r in rows)
    per_row = ", ".join(f"{n} with {k} edit image(s)" for k, n in sorted(counts.items()))
    print(f"wrote {args.output}: {len(rows)} rows ({per_row})")
    if max(counts) > 1:
        print("several edit images per row train Qwen-Image-Edit-2509 or 2511 (the Edit-Plus prompt)")
    base = os.path.dirname(args.output) or "."
    print("train with: --dataset_base_path " + shlex.quote(base) + " --dataset_metadata_path "
          + shlex.quote(args.output) + " --data_file_keys image,edit_image --extra_inputs edit_image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
