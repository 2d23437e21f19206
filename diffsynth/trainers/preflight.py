"""Checks of a training run's inputs that need no model: run before anything loads (and by --dry_run)."""
import os
import re

from ..lora import LoraError
from ..utils.image import open_image
from ..utils.vram_planner import QWEN_IMAGE_DIT
from .output_dir import check_output_path

_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")


def dit_blocks(args):
    """The DiT's block count from the tensor names in its local files' headers (nothing loads), or None when no
    DiT file is here yet (a download brings it). A file that cannot be read is left to the loader to report."""
    from ..utils.io import WeightFileError, read_keys_and_shapes, resolve_safetensors_files
    from ..utils.model_files import parse_model_paths, resolve_model_files

    if args.model_paths:
        sets = parse_model_paths(args.model_paths)
    else:
        sets = []
        for entry in (args.model_id_with_origin_paths or "").split(","):
            if entry.strip():
                try:
                    sets += resolve_model_files(entry, args.models_dir, download=False)
                except (WeightFileError, ValueError):
                    pass  # not downloaded yet
    for files in sets:
        try:
            keys = read_keys_and_shapes(resolve_safetensors_files(files))
        except (WeightFileError, ValueError, OSError):
            continue
        blocks = [int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m]
        if blocks:
            return max(blocks) + 1
    return None


def check_block_counts(args):
    """--blocks_to_checkpoint N and --blocks_to_swap N against the DiT's blocks, before anything loads."""
    asked = [(flag, getattr(args, flag)) for flag in ("blocks_to_checkpoint", "blocks_to_swap")
             if isinstance(getattr(args, flag, None), int) and getattr(args, flag) > 0]
    if not asked:
        return
    n = dit_blocks(args)
    where = "its files" if n else "the Qwen-Image DiT the model ids download"
    n = n or QWEN_IMAGE_DIT["num_layers"]  # the DiT the model ids download, when its files are not here yet
    for flag, value in asked:
        if value > n:
            raise ValueError(f"--{flag} {value}: the DiT has {n} blocks ({where}); give 1 to {n}")


def check_lora_targets(args):
    """--lora_target_modules against the linear layers of the DiT this script trains (merged or standard), on a
    one-block copy on the meta device (nothing loads): a name of the other layout is the same error inject_lora
    gives, but before the models load and the conditioning cache fills, and under --dry_run too."""
    if getattr(args, "lora_base_model", None) != "dit" or not getattr(args, "lora_target_modules", None):
        return
    import torch

    from ..lora.inject import _matches, _not_found_message, parse_target_modules
    from ..models.qwen_image_dit import QwenImageDiT
    from ..models.qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV

    with torch.device("meta"):
        dit = (QwenImageDiTMergedQKV if args.merged_qkv else QwenImageDiT)(num_layers=1)
    names = [name for name, module in dit.named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [t for t in parse_target_modules(args.lora_target_modules) if not any(_matches(n, t) for n in names)]
    if missing:
        raise ValueError(f"--lora_target_modules: {_not_found_message(missing, names)}")


def preflight(args, dataset=True):
    """Raise the first user-fixable problem (a ValueError naming the flag and file): output path, LoRA files,
    validation images and, with `dataset`, every row and file of the training data."""
    check_output_path(args.output_path)
    if args.cache_conditioning is not None:
        from .conditioning import check_cache_path

        check_cache_path(args.cache_conditioning or os.path.join(args.output_path, "cache"))
    check_block_counts(args)
    check_lora_targets(args)
    for flag in ("lora_checkpoint", "lora_fused"):
        path = getattr(args, flag)
        if path:
            try:
                from ..lora.adapters import check_any

                check_any(path)  # exists, is a Qwen-Image LoRA (or LoHa / LoKr / DoRA), holds no NaN/inf
            except LoraError as e:
                raise LoraError(f"--{flag}: {e}") from None
    for path in args.validation_edit_image or []:
        open_image(path)
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such training state "
                                "folder (give a checkpoints/step-N folder, or 'latest')")
    if dataset:
        from .dataset import validate_metadata

        return validate_metadata(args.dataset_metadata_path, args.dataset_base_path, args.data_file_keys,
                                 args.max_pixels, args.height, args.width, args.edit_image_area)
    return None
