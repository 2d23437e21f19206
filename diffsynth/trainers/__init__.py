import json
import sys

from .args import build_parser, parse_args


def main(argv=None, merged_qkv=True) -> int:
    """Entry point of train.py / train_merged_qkv.py. The heavy imports wait until the flags are known good."""
    args = parse_args(argv, merged_qkv)
    if args.dry_run:
        from .dataset import DatasetError
        from .preflight import preflight

        try:  # everything that needs no model: the data, the output path, LoRA and validation files
            samples = preflight(args)
        except DatasetError as e:
            print(f"error: dataset {args.dataset_metadata_path}:\n{e}", file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.blocks_to_checkpoint == "auto" and args.vram_budget:
            from ..utils.vram_planner import auto_checkpointed_blocks, parse_vram

            kept, said = auto_checkpointed_blocks(args, parse_vram(args.vram_budget))
            args.blocks_to_checkpoint = kept
            print(f"--blocks_to_checkpoint auto, --vram_budget {args.vram_budget}: {said}", file=sys.stderr)
        print(json.dumps(dict(sorted(vars(args).items())), indent=1))
        print(f"dry run: the flags, {len(samples)} training samples and the output path check out; no model was "
              "loaded", file=sys.stderr)
        from ..utils.vram_planner import plan_report

        print(plan_report(args), file=sys.stderr)
        return 0
    from .trainer import run

    return run(args)


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["Trainer", "build_parser", "main", "parse_args"]
