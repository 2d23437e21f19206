"""Edit an image with Qwen-Image-Edit and a LoRA, on the merged-QKV DiT (or the standard one with --standard).

    python examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py \\
        --edit_image edit.png --prompt "your editing prompt" --output output.png \\
        --lora_path ./models/my_merged_qkv_lora/checkpoint-final.safetensors

--edit_image is the image to edit (repeat it for several with Qwen-Image-Edit-2509/2511). --input_image is
DiffSynth-Studio's init image: the output takes its aspect ratio (at --edit_image_area pixels, unless --height and
--width are given), and with --denoising_strength below 1 generation starts from its pixels, noised to that strength;
at the default 1.0 only its size is used (the script says so). Without --input_image the output takes the last edit
image's aspect ratio at --edit_image_area pixels (a 128x128 edit image gives 1024x1024 at the default area).
The LoRA may be in either layout (to_qkv or to_q/to_k/to_v) and any common format; it is fused into the DiT.
Models are found under --models_dir (default ./models, or $DIFFSYNTH_MODELS_DIR) and downloaded from ModelScope
when missing. Every input (images, LoRA, flags, output path, model files) is checked before the models load.

Several images in one run (the models load once; musubi-tuner's --from_file): --prompts FILE instead of --prompt,
a file as the trainer's --validation_prompts reads it (.json list, .jsonl, .csv, or musubi-tuner's .txt with --d seed,
--ci edit image, --w/--h size, --s steps, --l CFG scale, --n negative prompt; relative paths from the file's folder).
What a row leaves out comes from --seed, --num_steps, --cfg_scale, --negative_prompt, --edit_image, --height/--width;
row k is written to --output/<k>.png (001.png, 002.png, ...; --output defaults to outputs/<FILE's name>/):

    python examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py \\
        --prompts prompts.txt --lora_path ./models/my_merged_qkv_lora/checkpoint-final.safetensors
"""
import argparse
import math
import os
import sys
import tempfile

from PIL import Image

from diffsynth.utils.cli import ArgumentParser

LIGHTNING_CFG = "the Lightning LoRAs are distilled to run without CFG (cfg 1); expect overcooked images"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edit_image", action="append", default=[], metavar="PATH",
                        help="image to edit; repeat for several (Edit-2509/2511)")
    parser.add_argument("--input_image", default=None, metavar="PATH",
                        help="init image: sets the output's aspect ratio, and its pixels are the starting point with "
                             "--denoising_strength < 1 (not with --prompts)")
    parser.add_argument("--denoising_strength", type=float, default=1.0,
                        help="1.0 starts from pure noise; lower keeps more of --input_image (0 < strength <= 1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the editing prompt (one image)")
    source.add_argument("--prompts", metavar="FILE",
                        help="one image per row of FILE (.json, .jsonl, .csv, or musubi-tuner's .txt: the trainer's "
                             "--validation_prompts format), the models loaded once; a row's missing seed, steps, "
                             "cfg_scale, negative_prompt, edit_image, width/height come from the flags")
    parser.add_argument("--negative_prompt", default=" ",
                        help="true CFG runs with a negative prompt (default ' ', as the official examples)")
    parser.add_argument("--cfg_scale", type=float, default=None,
                        help="1 turns CFG off (half the DiT passes); default 4, or 1 with --scheduler_preset lightning")
    parser.add_argument("--output", default=None,
                        help="image file to write (.png, .jpg, ...; default output.png in the current folder); with "
                             "--prompts the folder row k's <k>.png goes to (001.png, ...; default outputs/<FILE's "
                             "name>/), created if missing; existing images of the same names are replaced")
    parser.add_argument("--lora_path", action="append", default=[],
                        help="LoRA .safetensors to fuse into the DiT; repeat to stack several (e.g. yours and a "
                             "Lightning LoRA)")
    parser.add_argument("--lora_scale", type=float, action="append", default=None,
                        help="strength of each --lora_path, in order (one value applies to all; default 1.0)")
    parser.add_argument("--model_id_with_origin_paths", default=None,
                        help="comma-separated 'model_id:pattern' entries (default: the DiT of Qwen/Qwen-Image-Edit, "
                        "the text encoder and VAE of Qwen/Qwen-Image)")
    parser.add_argument("--model_paths", default=None,
                        help='JSON list of local model files, e.g. \'["dit.safetensors", "vae.safetensors"]\'')
    parser.add_argument("--models_dir", default=None, help="where model ids are looked up (default ./models)")
    parser.add_argument("--tokenizer_path", default=None, help="default: <text encoder repo>/tokenizer/")
    parser.add_argument("--processor_path", default=None, help="default: <DiT repo>/processor/")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--merged_qkv", dest="merged_qkv", action="store_true", default=True,
                        help="run the merged-QKV DiT (default)")
    layout.add_argument("--standard", dest="merged_qkv", action="store_false", help="run the standard DiT")
    parser.add_argument("--num_steps", type=int, default=None,
                        help="denoising steps; default 30, or 8 with --scheduler_preset lightning (4 for a 4-step LoRA)")
    parser.add_argument("--scheduler_preset", choices=["default", "lightning"], default="default",
                        help="lightning: the settings of the 4/8-step Lightning LoRAs (lightx2v/Qwen-Image-Lightning, "
                             "load one with --lora_path): shift 3 at every resolution, no terminal stretch, no CFG")
    parser.add_argument("--height", type=int, default=None,
                        help="output height, rounded down to 16 (default: --input_image's, else the last edit "
                             "image's aspect ratio at --edit_image_area pixels, sides rounded to 32)")
    parser.add_argument("--width", type=int, default=None, help="output width, rounded down to 16 (default: as "
                                                                 "--height)")
    parser.add_argument("--edit_plus", action="store_true",
                        help="Qwen-Image-Edit-2509: the Edit-Plus prompt template even for one edit image (used "
                             "anyway for several images and for Edit-2511 models)")
    parser.add_argument("--edit_image_area", type=int, default=None,
                        help="pixel area of each edit image for the VAE (default: the area the --lora_path was trained "
                             "at, which this project's trainer records in its metadata, else 1024*1024)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--offload", nargs="?", const="model", default=None, choices=["model", "sequential"],
                        help="keep idle components in host memory, each visiting the GPU only while it runs; "
                             "'sequential' also streams the text encoder module by module (it is larger than a "
                             "16 GB GPU)")
    parser.add_argument("--blocks_to_swap", type=int, default=0, metavar="N",
                        help="keep the DiT's last N blocks (of 60) in pinned host memory, each copied to the GPU "
                             "just ahead of its use; QUICKSTART.md has values per GPU size")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the DiT blocks: the first step compiles (about a minute), the others run "
                             "faster; worth it from a few images on: --prompts, whose rows share the compiled "
                             "blocks (other sizes and prompt lengths included)")
    parser.add_argument("--fp8_compute", action="store_true",
                        help="DiT weights in fp8 (half the DiT's weight memory) and fp8 matmuls: fast on GPUs with "
                             "compute capability 8.9+ (Ada, Hopper); older GPUs get fp8 storage only (it says "
                             "so); a CPU runs the fp8 matmuls emulated (slow: for tests)")
    args = parser.parse_args(argv)
    if args.blocks_to_swap < 0:
        parser.error(f"--blocks_to_swap {args.blocks_to_swap}: must be >= 0")
    scale_without_lora = args.lora_scale is not None and not args.lora_path
    scales = args.lora_scale or [1.0]
    if args.lora_path and len(scales) not in (1, len(args.lora_path)):
        parser.error(f"{len(scales)} --lora_scale values for {len(args.lora_path)} --lora_path: give one per LoRA, "
                     "or one for all")
    args.lora_scale = scales * len(args.lora_path) if len(scales) == 1 else scales
    lightning = args.scheduler_preset == "lightning"
    if lightning and args.cfg_scale is not None and args.cfg_scale > 1:
        print(f"warning: --cfg_scale {args.cfg_scale} with --scheduler_preset lightning: {LIGHTNING_CFG}",
              file=sys.stderr)
    if args.num_steps is None:
        args.num_steps = 8 if lightning else 30
    args.cfg_scale = args.cfg_scale if args.cfg_scale is not None else (1.0 if lightning else 4.0)
    if not args.edit_image and not args.prompts:
        parser.error("--edit_image is required: the image to edit (--input_image is only the init image, see --help)")
    problems = []
    if args.prompts:
        stem = os.path.splitext(os.path.basename(args.prompts.rstrip(os.sep)))[0]
        args.output = args.output or os.path.join("outputs", stem)
        if os.path.splitext(args.output)[1].lower() in Image.registered_extensions():
            problems.append(f"--output {args.output} names an image file; with --prompts it is the folder the images "
                            f"go to (e.g. {os.path.splitext(args.output)[0]})")
        given = [f for f, on in (("--input_image", args.input_image), ("--denoising_strength",
                                                                         args.denoising_strength != 1)) if on]
        if given:  # one init image fixes one size, while rows have their own
            problems.append(f"{' and '.join(given)} with --prompts: each row's output size is its width/height or "
                            "its last edit image's, and it starts from noise; run one image at a time (--prompt) to "
                            "start from an init image")
    args.output = args.output or "output.png"
    problems += [f"--{name} must be a finite number (got {value})"
                 for name in ("lora_scale", "cfg_scale", "denoising_strength")
                 for value in (scales if name == "lora_scale" else [getattr(args, name)])
                 if not math.isfinite(value)]
    if math.isfinite(args.denoising_strength) and not 0 < args.denoising_strength <= 1:
        problems.append(f"--denoising_strength must be in (0, 1] (got {args.denoising_strength})")
    elif args.denoising_strength < 1 and args.input_image is None and not args.prompts:
        problems.append(f"--denoising_strength {args.denoising_strength} needs --input_image (the image it starts "
                        "from); without one generation starts from pure noise")
    if scale_without_lora:
        problems.append("--lora_scale without --lora_path: there is no LoRA to scale; add --lora_path FILE")
    if math.isfinite(args.cfg_scale) and args.cfg_scale < 1:
        problems.append(f"--cfg_scale must be >= 1 (got {args.cfg_scale}); 1 turns CFG off")
    for name, low in (("num_steps", 1), ("edit_image_area", 32 * 32), ("height", 16), ("width", 16)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            problems.append(f"--{name} must be >= {low} (got {getattr(args, name)})")
    for name in ("prompt", "negative_prompt"):
        if getattr(args, name) is None:  # --prompts: the file's text is checked as it is read
            continue
        try:
            getattr(args, name).encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes on the command line arrive as surrogates
            problems.append(f"--{name} is not valid UTF-8 text (undecodable byte at character {e.start + 1}); "
                            "set your terminal to UTF-8 or pass the prompt from a UTF-8 file")
    if problems:
        parser.error("; ".join(problems))
    return args


def check_output(path, inputs=()):
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a folder; name an image file, e.g. {os.path.join(path, 'output.png')}")
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"--output {path}: unknown image extension {ext!r}; use .png or .jpg")
    if fmt not in Image.SAVE:  # e.g. .psd: Pillow reads it but has no writer
        raise ValueError(f"--output {path}: Pillow cannot write {fmt} ({ext}) files; use .png or .jpg")
    if os.path.realpath(path) in {os.path.realpath(p) for p in inputs}:
        raise ValueError(f"--output {path} is also an input image; write the edit to a new path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output {path}: {parent} is a file; choose another output path")
    try:  # create a file there, as the save will: os.access says yes to root everywhere, /proc included
        with tempfile.NamedTemporaryFile(prefix=".tmp-", dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"--output {path}: cannot create a file in {parent} ({e.strerror}); choose another "
                         "output path") from None


def resolve_edit_image_area(args):
    """--edit_image_area when given, else the area the LoRA(s) were trained at (the trainer's metadata), else 1024*1024:
    a LoRA trained on 512x512 edit images is not silently fed 1024x1024 ones. A flag that differs is noted."""
    from diffsynth.utils.image import VAE_EDIT_AREA
    from diffsynth.utils.io import read_metadata

    trained = {}
    for path in args.lora_path:
        try:
            trained[path] = int(read_metadata(path)["edit_image_area"])
        except Exception:  # no such field (another tool's LoRA), or a file check_any names the problem of
            continue
    areas = sorted(set(trained.values()))
    if args.edit_image_area is None:
        args.edit_image_area = areas[0] if len(areas) == 1 else VAE_EDIT_AREA
        if len(areas) == 1 and areas[0] != VAE_EDIT_AREA:
            print(f"note: --edit_image_area {areas[0]}: the area {', '.join(trained)} was trained at (its metadata); "
                  "pass --edit_image_area to choose another", file=sys.stderr)
        elif len(areas) > 1:
            print(f"note: the LoRAs were trained at different edit image areas ({', '.join(map(str, areas))}); using "
                  f"{VAE_EDIT_AREA}: pass --edit_image_area to choose", file=sys.stderr)
        return
    for path, area in trained.items():
        if area != args.edit_image_area:
            print(f"note: --edit_image_area {args.edit_image_area} differs from the {area} px area {path} was trained "
                  "at (its metadata)", file=sys.stderr)


def output_path(args, sample, rows):
    """Where a sample's image goes: --output, or with --prompts <--output>/<row>.png, zero-padded so they sort."""
    if not args.prompts:
        return args.output
    return os.path.join(args.output, f"{int(sample.folder):0{max(3, len(str(rows)))}d}.png")


def open_inputs(args):
    """Check every input and decode the flags' images before the heavy imports and model loading: a wrong path, a
    bad image, row or a damaged LoRA fails in seconds, not after minutes of loading. -> (the samples to generate,
    each with its values resolved; {--edit_image path: image}; the --input_image or None)."""
    from diffsynth.trainers.validation import ValidationSample, read_validation_prompts, with_defaults
    from diffsynth.utils.image import MAX_EDIT_AREA, check_cover, check_edit_size, edit_image_size, open_image

    resolve_edit_image_area(args)
    if args.edit_image_area > MAX_EDIT_AREA:  # checked here: the image module imports torch, parse_args does not
        raise ValueError(f"--edit_image_area must be <= {MAX_EDIT_AREA} (4096x4096; the models were trained at "
                         f"1024x1024 = 1048576), got {args.edit_image_area}")
    images = {p: open_image(p) for p in args.edit_image}  # with --prompts: the images of rows that name none
    input_image = open_image(args.input_image) if args.input_image else None
    # the VAE sees each edit image at --edit_image_area, the VL text encoder at its template's area
    for path, img in images.items():
        check_edit_size(f"--edit_image {path}", img.size, args.edit_image_area)
    size_note = None  # printed once every check passed: a refused run says one line
    if input_image is not None and (args.height is None or args.width is None):  # it sets the output size
        check_edit_size(f"--input_image {args.input_image}", input_image.size, args.edit_image_area, vl=False)
        w, h = edit_image_size(*input_image.size, target_area=args.edit_image_area)
        args.height, args.width = args.height or h, args.width or w
        note = ("its pixels start the denoising" if args.denoising_strength < 1.0 else
                "its pixels are not used at --denoising_strength 1.0 (pure noise; pass e.g. 0.7 to start from it)")
        size_note = (f"note: --input_image {args.input_image} sets the output size {args.width // 16 * 16}x"
                     f"{args.height // 16 * 16}; {note}")
    elif input_image is not None and args.denoising_strength < 1:  # its pixels, cut to --width x --height
        check_cover(f"--input_image {args.input_image}", input_image.size, args.width // 16 * 16,
                    args.height // 16 * 16, fix=f"crop it closer to {args.width}:{args.height}, or leave out --height "
                    "and --width (the output then takes its aspect ratio)")
    # every row, value and file of --prompts checked as the trainer checks --validation_prompts
    samples = (read_validation_prompts(args.prompts, args.edit_image_area, flag="--prompts") if args.prompts
               else [ValidationSample(args.prompt, where="--prompt")])
    # a row's own cfg_scale overrides the preset's 1 as --cfg_scale would: warned of as the flag is (parse_args)
    cfg_rows = [f"{s.where} ({s.cfg_scale:g})" for s in samples if args.scheduler_preset == "lightning"
                and s.cfg_scale is not None and s.cfg_scale > 1]
    samples = with_defaults(samples, edit_images=tuple(args.edit_image), seed=args.seed, steps=args.num_steps,
                            cfg_scale=args.cfg_scale, negative_prompt=args.negative_prompt, height=args.height,
                            width=args.width)
    bare = [s.where for s in samples if not s.edit_images]
    if bare:
        raise ValueError(f"--prompts {args.prompts}: {', '.join(bare)}: no edit image; give the row an edit_image "
                         "(--ci in a .txt), or pass --edit_image for the rows that name none")
    if args.prompts and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output} is a file; with --prompts it is the folder the images go to (created "
                         "if missing): name a folder")
    inputs = [*images, *([args.input_image] if args.input_image else []), *(p for s in samples for p in s.edit_images)]
    for sample in samples:
        check_output(output_path(args, sample, len(samples)), inputs)
    from diffsynth.lora.adapters import check_any

    for path in args.lora_path:  # exists, is a Qwen-Image LoRA / LoHa / LoKr / DoRA, holds no NaN/inf
        if check_any(path):  # the output would be the base model's while the run reports the LoRA fused
            raise ValueError(f"--lora_path {path}: every delta is zero (alpha 0, or an untrained LoRA whose up "
                             "weights are 0): fusing it would change nothing; pass a trained LoRA")
    if size_note:
        print(size_note, file=sys.stderr)
    if cfg_rows:
        print(f"warning: --prompts {args.prompts}: cfg_scale above 1 with --scheduler_preset lightning in "
              f"{', '.join(cfg_rows[:5])}{' ...' * (len(cfg_rows) > 5)}: {LIGHTNING_CFG}", file=sys.stderr)
    return samples, images, input_image


def peak_memory_line(device):
    import resource

    import torch

    if device.startswith("cuda"):
        return (f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
                "(torch.cuda.max_memory_allocated, after loading)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return f"peak memory: GPU not used ({device}); peak RSS of this process {rss:.2f} GiB (loading included)"


def main(argv=None):
    args = parse_args(argv)
    from diffsynth.utils.image import NonFiniteOutputError, open_image

    saved = []  # with --prompts: the rows written before an error
    try:
        samples, images, input_image = open_inputs(args)
        import torch

        from diffsynth.pipelines.qwen_image import QwenImagePipeline, host_memory_note, parse_dtype
        from diffsynth.schedulers import FlowMatchScheduler
        from diffsynth.utils.io import atomic_path

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
        note = host_memory_note(device, offload=args.offload, blocks_to_swap=args.blocks_to_swap)
        if note:
            print(note, file=sys.stderr)
        pipe = QwenImagePipeline.from_pretrained(
            model_id_with_origin_paths=args.model_id_with_origin_paths, model_paths=args.model_paths,
            models_dir=args.models_dir, tokenizer_path=args.tokenizer_path, processor_path=args.processor_path,
            merged_qkv=args.merged_qkv, device=device, torch_dtype=dtype, offload=args.offload or False,
            edit_plus=args.edit_plus or None, blocks_to_swap=args.blocks_to_swap,
        )
        pipe.scheduler = FlowMatchScheduler.from_preset(args.scheduler_preset)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)  # the edit's peak, not the loading's
        for path, scale in zip(args.lora_path, args.lora_scale):
            changed = pipe.load_lora(path, scale=scale)
            print(f"fused {path} into {len(changed)} layers (scale {scale})")
        if args.fp8_compute:
            print(pipe.enable_fp8(compute=True))
        if args.compile:
            print(f"--compile: {pipe.compile()} DiT blocks compile on the first denoising step")
        for i, sample in enumerate(samples, 1):  # the text encoder and the DiT run per row; the models loaded once
            image = pipe(
                sample.prompt, edit_image=[images[p] if p in images else open_image(p) for p in sample.edit_images],
                negative_prompt=sample.negative_prompt, cfg_scale=sample.cfg_scale, num_inference_steps=sample.steps,
                height=sample.height, width=sample.width, seed=sample.seed, input_image=input_image,
                denoising_strength=args.denoising_strength, edit_image_area=args.edit_image_area,
            )
            path = output_path(args, sample, len(samples))
            replaced = os.path.exists(path)  # an earlier output: check_output refused the input images
            with atomic_path(path) as tmp:
                image.save(tmp)  # the temporary name keeps the extension, which picks the format
            saved.append(path)
            row = f"[{i}/{len(samples)}] {sample.where} (seed {sample.seed}): " if args.prompts else ""
            note = "; replaced the existing file" if replaced else ""
            print(f"{row}saved {path} ({image.width}x{image.height}{note})", flush=True)
    except NonFiniteOutputError as e:  # nothing is written: a NaN image would be a black PNG
        loras = ", ".join(f"{p} at --lora_scale {s}" for p, s in zip(args.lora_path, args.lora_scale))
        lora = f" with the LoRA {loras}" if loras else ""
        row = f"--prompts {args.prompts} {sample.where}: " if args.prompts else ""
        kept = f" ({len(saved)} earlier row(s) saved in {args.output})" if saved else ""
        print(f"error: {row}{e}{lora}; no image written{kept}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad paths, files, flags, images, rows, LoRAs: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prompts:
        print(f"wrote {len(saved)} images to {args.output}")
    print(peak_memory_line(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
