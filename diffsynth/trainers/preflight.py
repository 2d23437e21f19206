"""Checks of a training run's inputs that need no model: run before anything loads (and by --dry_run)."""
import filecmp
import os
import re

from ..lora import LoraError
from ..utils.vram_planner import QWEN_IMAGE_DIT
from .args import build_parser
from .output_dir import check_output_path

_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")


def dit_keys(args) -> dict | None:
    """The tensor names and shapes in the headers of the DiT's local files (nothing loads), or None when no DiT file
    is here yet (a download brings it). A file that cannot be read is left to the loader to report."""
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
        if any(map(_BLOCK_KEY.match, keys)):
            return keys
    return None


def dit_blocks(args):
    """The DiT's block count from its files' tensor names, or None when no DiT file is here yet."""
    keys = dit_keys(args)
    return None if keys is None else max(int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m) + 1


def _dit_linear_names(args) -> dict:
    """The DiT's linear layer names in this script's q/k/v layout: from its files' headers, or, when its files are
    not here yet, from the Qwen-Image DiT the model ids download, built on the meta device (nothing allocated)."""
    from ..lora.reader import MERGED_PARTS, PART_OF

    keys = dit_keys(args)
    if keys is None:
        import torch

        from ..models.qwen_image_dit import QwenImageDiT
        from ..models.qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV

        with torch.device("meta"):
            dit = (QwenImageDiTMergedQKV if args.merged_qkv else QwenImageDiT)()
        return dict.fromkeys(name for name, module in dit.named_modules() if isinstance(module, torch.nn.Linear))
    names = {}
    for key, shape in keys.items():
        if key.endswith(".weight") and len(shape) == 2:
            stem, _, leaf = key[: -len(".weight")].rpartition(".")
            if args.merged_qkv:  # the loader merges q/k/v (or splits them for the standard DiT)
                leaves = [PART_OF[leaf][0]] if leaf in PART_OF else [leaf]
            else:
                leaves = MERGED_PARTS.get(leaf, [leaf])
            names.update(dict.fromkeys(f"{stem}.{x}" if stem else x for x in leaves))
    return names


def _lora_layer_names(args) -> dict | None:
    """The DiT's linear layer names (`_dit_linear_names`), or None when they are not this project's (the default
    targets do not match them): a checkpoint of another key style is converted by the loader, so checks against its
    names would be wrong."""
    from ..lora.inject import check_target_modules

    names = _dit_linear_names(args)
    try:
        check_target_modules(build_parser(args.merged_qkv).get_default("lora_target_modules"), names)
    except ValueError:
        return None
    return names


def check_lora_targets(args, names):
    """--lora_target_modules against the DiT's linear layers `names` (_lora_layer_names) in this script's q/k/v
    layout, before anything loads and under --dry_run too (inject_lora found a wrong name only after the models had
    loaded and the conditioning cache had filled). names None: another key style, not checked here."""
    from ..lora.inject import check_target_modules

    if names is None:
        return
    try:
        check_target_modules(args.lora_target_modules, names)
    except ValueError as e:
        raise ValueError(f"--lora_target_modules {args.lora_target_modules}: {e}") from None


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


def check_lora_checkpoint(args, names):
    """--lora_checkpoint fits the adapters this run injects: its type (--lora_type), DiT layout, --lora_rank and, for
    LoHa/LoKr/DoRA, --lora_alpha, and its modules against the adapters --lora_target_modules makes of the DiT's
    linear layers `names` (_lora_layer_names; None: not checked), read from the file before the DiT loads (a mismatch
    found after loading costs minutes; another alpha was not found at all)."""
    from ..lora.adapters import adapter_type, read_adapters
    from ..lora.reader import MERGED_PARTS, PART_OF, lora_modules, read_lora
    from ..utils.io import read_metadata

    path, want = args.lora_checkpoint, args.lora_type
    if args.lora_fused and filecmp.cmp(path, args.lora_fused, shallow=False):
        raise LoraError(f"--lora_checkpoint and --lora_fused are the same LoRA ({path}): the run would apply it twice "
                        "(fused into the DiT, and again as the adapter's start). To continue training it, give it as "
                        "--lora_checkpoint only; to train a new LoRA on top of it, as --lora_fused only")
    kind = adapter_type(path)
    if kind != want:
        raise LoraError(f"--lora_checkpoint {path} is a {kind}, not a {want}: continue it with --lora_type {kind}")
    modules = lora_modules(read_lora(path)) if kind == "lora" else read_adapters(path)[0]
    leaves = {name.rsplit(".", 1)[-1] for name in modules}
    layout = "merged_qkv" if leaves & set(MERGED_PARTS) else "standard" if leaves & set(PART_OF) else None
    if layout and layout != ("merged_qkv" if args.merged_qkv else "standard"):
        ours, script, direction = (("merged-QKV", "train.py", "to_merged") if layout == "standard" else
                                   ("standard", "train_merged_qkv.py", "to_standard"))
        raise LoraError(f"--lora_checkpoint {path} was trained on the {layout.replace('_qkv', '-QKV')} DiT layout, "
                        f"this script trains the {ours} one: continue it with {script}, or convert it first "
                        f"(convert_merged_qkv_checkpoint.py --direction {direction})")
    # The modules: load_lora_weights needs the file's modules to be exactly the adapters this run injects. Compared
    # by their names within a block (the DiT read here may be the downloadable one, of another block count than a
    # test's tiny model; a LoRA of another model is the loader's to refuse)
    if names is not None:
        from ..lora.inject import matches_target, parse_target_modules

        targets = parse_target_modules(args.lora_target_modules)
        in_block = lambda names: {re.sub(r"^transformer_blocks\.\d+\.", "", n) for n in names}  # noqa: E731
        injected = in_block(n for n in names if any(matches_target(n, t) for t in targets))
        extra, missing = sorted(in_block(modules) - injected), sorted(injected - in_block(modules))
        if extra or missing:
            trained = read_metadata(path).get("target_modules")
            hint = f" (its metadata: {trained})" if trained else ""
            parts = [f"{len(extra)} of its modules (per block) get no adapter in this run ({', '.join(extra[:3])})"
                     * bool(extra), f"{len(missing)} adapters of this run (per block) are not in it "
                     f"({', '.join(missing[:3])})" * bool(missing)]
            raise LoraError(f"--lora_checkpoint {path} does not fit --lora_target_modules {args.lora_target_modules}: "
                            f"{'; '.join(p for p in parts if p)}. Give the --lora_target_modules it was trained "
                            f"with{hint}")
    # A LoRA's rank is in its shapes (and load_lora_weights rescales B to another alpha); peft's LoHa/LoKr/DoRA
    # weights load as they are, at this run's alpha / rank: the trainer's metadata says what they were trained with
    meta = {} if kind == "lora" else read_metadata(path)
    if kind == "lora":
        ranks = sorted({A.shape[0] for A, _ in modules.values()})
    else:
        ranks = [int(meta.get("rank", args.lora_rank))]
    if ranks != [args.lora_rank]:
        raise LoraError(f"--lora_checkpoint {path} has rank {', '.join(map(str, ranks))}, this run --lora_rank "
                        f"{args.lora_rank}: continue it with the rank it was trained with")
    alpha, ours = float(meta.get("alpha", 0)) or None, args.lora_alpha or args.lora_rank
    if alpha is not None and alpha != ours:
        raise LoraError(f"--lora_checkpoint {path} is a {kind} trained with --lora_alpha {alpha:g}, this run has "
                        f"--lora_alpha {ours:g}: its weights would act at another scale (alpha / rank), not as "
                        f"trained; continue it with --lora_alpha {alpha:g}")


def preflight(args, dataset=True):
    """Raise the first user-fixable problem (a ValueError naming the flag and file): output path, LoRA files,
    validation images and, with `dataset`, every row and file of the training data."""
    check_output_path(args.output_path)
    if args.cache_conditioning is not None:
        from .conditioning import check_cache_path

        check_cache_path(args.cache_conditioning or os.path.join(args.output_path, "cache"))
    check_block_counts(args)
    for flag in ("lora_checkpoint", "lora_fused"):
        path = getattr(args, flag)
        if path:
            try:
                from ..lora.adapters import check_any

                check_any(path)  # exists, is a Qwen-Image LoRA (or LoHa / LoKr / DoRA), holds no NaN/inf
            except LoraError as e:
                raise LoraError(f"--{flag}: {e}") from None
    if args.lora_base_model:
        names = _lora_layer_names(args)  # the DiT's file headers, or the downloadable DiT built on the meta device
        check_lora_targets(args, names)
        if args.lora_checkpoint:
            check_lora_checkpoint(args, names)
    from .validation import validation_samples

    validation_samples(args)  # --validation_edit_image, or every row and image of --validation_prompts
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such training state "
                                "folder (give a checkpoints/step-N folder, or 'latest')")
    if dataset:
        from .dataset import validate_metadata

        return validate_metadata(args.dataset_metadata_path, args.dataset_base_path, args.data_file_keys,
                                 args.max_pixels, args.height, args.width, args.edit_image_area)
    return None
