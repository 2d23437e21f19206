"""Checks of a training run's inputs that need no model: run before anything loads (and by --dry_run)."""
import os

from ..lora import LoraError, read_lora
from ..utils.image import open_image
from .output_dir import check_output_path


def preflight(args, dataset=True):
    """Raise the first user-fixable problem (a ValueError naming the flag and file): output path, LoRA files,
    validation images and, with `dataset`, every row and file of the training data."""
    check_output_path(args.output_path)
    for flag in ("lora_checkpoint", "lora_fused"):
        path = getattr(args, flag)
        if path:
            try:
                from ..lora.adapters import adapter_type, read_adapters

                # exists, is a Qwen-Image LoRA (or LoHa / LoKr / DoRA), holds no NaN/inf
                read_lora(path) if adapter_type(path) == "lora" else read_adapters(path)
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
