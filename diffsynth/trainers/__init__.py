import json
import sys

from .args import build_parser, parse_args


def main(argv=None, merged_qkv=True) -> int:
    """Entry point of train.py / train_merged_qkv.py. The heavy imports wait until the flags are known good."""
    args = parse_args(argv, merged_qkv)
    if args.dry_run:
        return dry_run(args)
    from .trainer import run

    return run(args)


def dry_run(args) -> int:
    """--dry_run: everything that needs no model (the data, the output path, LoRA and validation files), then the
    flags and the VRAM plan for the processes the launcher started. Under `accelerate launch` every process checks,
    one per machine prints."""
    from .dataset import DatasetError, area_summary
    from .distributed import launch_environment, reports_errors
    from .preflight import preflight

    say = reports_errors()
    try:
        samples = preflight(args)
    except DatasetError as e:
        if say:
            print(f"error: dataset {args.dataset_metadata_path}:\n{e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if say:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if not say:
        return 0
    from ..utils.vram_planner import auto_checkpointed_blocks, parse_vram, plan_report

    processes, fsdp = launch_environment()
    if args.blocks_to_checkpoint == "auto" and args.vram_budget:
        kept, said = auto_checkpointed_blocks(args, parse_vram(args.vram_budget), None, processes, fsdp)
        args.blocks_to_checkpoint = kept
        print(f"--blocks_to_checkpoint auto, --vram_budget {args.vram_budget}: {said}", file=sys.stderr)
    print(json.dumps(dict(sorted(vars(args).items())), indent=1))
    print(f"dry run: the flags, {len(samples)} training samples and the output path check out; no model was "
          "loaded", file=sys.stderr)
    for line in area_summary(samples):
        print(line, file=sys.stderr)
    print(plan_report(args, processes, fsdp), file=sys.stderr)
    from .validation import describe_samples, validation_samples

    for line in describe_samples(validation_samples(args), args):  # checked by preflight: read again to list
        print(line, file=sys.stderr)
    return 0


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["Trainer", "build_parser", "main", "parse_args"]
