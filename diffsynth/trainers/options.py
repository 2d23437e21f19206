"""Flags of the training options users know from musubi-tuner, ai-toolkit and diffusers' scripts (optimizers, lr
schedules, timestep sampling, EMA, caption dropout, trackers, LoRA flavours), and their checks. Every check runs
before anything loads; an optional package that an option needs and that is missing is named with its pip
command."""
import ast
import importlib.util
import math
import re

# name -> (module, class, pip extra of this project, PyPI package); torch's and transformers' come with the install.
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None, None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb", "bitsandbytes"),
    "adafactor": ("transformers.optimization", "Adafactor", None, None),
    "prodigy": ("prodigyopt", "Prodigy", "prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion", "lion-pytorch"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree", "schedulefree"),
}
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


class OptimizerError(ValueError):
    """An optimizer flag that cannot work: unknown class, missing package, bad --optimizer_args."""


def missing_package_message(flag: str, package: str, extra: str) -> str:
    return (f"{flag} needs the `{package}` package, which is not installed: pip install -e .[{extra}] "
            f"(or pip install {package})")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes: "betas=(0.9,0.99),eps=1e-8" -> two items."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_optimizer_args(items) -> dict:
    """["betas=(0.9,0.99),weight_decay=0.1", "decouple=True"] -> {"betas": (0.9, 0.99), ...}.

    Values are Python literals (numbers, True/False/None, tuples, lists, quoted strings); a plain word is kept as
    text, so `d_coef=2` is an int and `foo=bar` the string "bar" (brackets or quotes that do not parse are refused). A bare comma list of literals is a tuple, as
    musubi-tuner writes it: `betas=0.9,0.999` is `betas=(0.9,0.999)`.
    """
    out = {}
    for item in items or []:
        # [key, [value parts]]: a part without `key=` continues the value before it (musubi's betas=0.9,0.999)
        pairs = []
        for part in _split_top_level(item):
            key, sep, value = part.partition("=")
            if sep and key.strip().isidentifier():
                pairs.append([key.strip(), [value.strip()]])
            elif pairs:
                pairs[-1][1].append(part)
            else:
                raise OptimizerError(f"--optimizer_args {part!r}: expected key=value, e.g. betas=(0.9,0.99)")
        for key, parts in pairs:
            value = ",".join(parts)
            try:
                out[key] = ast.literal_eval(value)  # "0.9,0.999" is the tuple (0.9, 0.999)
            except (ValueError, SyntaxError):
                # Text is kept for a plain word only (name=x). "a,b" would be a guess; brackets or quotes that do not
                # parse, or a second key= after a space (two pairs in one quoted argument), are typos the optimizer
                # would reject only once the models have loaded
                two = re.search(r"\s([A-Za-z_]\w*)\s*=", value)
                if len(parts) > 1 or two or re.search(r"[()\[\]{}'\"]", value):
                    fix = (f"{key}=... and {two[1]}=... are two arguments: separate them with a space outside the "
                           "quotes, or a comma" if two else f"check its brackets and quotes; quote a text value: "
                           f"{key}='...'")
                    what = "a comma list must be Python literals" if len(parts) > 1 else "not a Python literal"
                    raise OptimizerError(f"--optimizer_args {key}={value}: {what} (numbers, True/False/None, quoted "
                                         f"strings, tuples), e.g. betas=0.9,0.999; {fix}") from None
                out[key] = value
    return out

SAMPLERS = ("diffsynth", "uniform", "logit_normal", "shift", "qwen_shift")
WEIGHTINGS = ("bell", "none", "logit_normal")

TRACKERS = {"csv": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "swanlab": ("swanlab", "swanlab")}  # name -> (module, pip extra); csv is always written
LORA_TYPES = ("lora", "loha", "lokr", "dora")
TRACKER_PROJECT = "qwen-image-edit-lora"  # --tracker_project_name's default
# Options that shape one lr schedule or timestep draw: flag -> (default, what uses it, whether these flags use it).
# Given with other flags, they would do nothing, so they are refused.
_LOGIT = ("--timestep_sampling logit_normal, shift or qwen_shift, or --weighting_scheme logit_normal",
          lambda a: a.timestep_sampling in ("logit_normal", "shift", "qwen_shift")
          or a.weighting_scheme == "logit_normal")
SHAPE_OPTIONS = {
    "lr_min_ratio": (0.0, "a decaying --lr_scheduler (linear, cosine, cosine_with_restarts, polynomial)",
                     lambda a: a.lr_scheduler != "constant"),
    "lr_num_cycles": (1, "--lr_scheduler cosine_with_restarts", lambda a: a.lr_scheduler == "cosine_with_restarts"),
    "lr_power": (1.0, "--lr_scheduler polynomial", lambda a: a.lr_scheduler == "polynomial"),
    "logit_mean": (0.0, *_LOGIT),
    "logit_std": (1.0, *_LOGIT),
    "discrete_flow_shift": (3.0, "--timestep_sampling shift", lambda a: a.timestep_sampling == "shift"),
}


def add_training_options(p):
    g = p.add_argument_group("optimizer, schedule, timesteps, EMA (musubi-tuner / ai-toolkit / diffusers options)")
    g.add_argument("--optimizer", default="adamw", metavar="NAME",
                   help=f"{' | '.join(OPTIMIZERS)} | an import path such as torch.optim.RAdam (default adamw)")
    g.add_argument("--optimizer_args", nargs="+", action="extend", default=None, metavar="K=V",
                   help="extra optimizer arguments as Python literals, comma- or space-separated, e.g. "
                        "\"betas=(0.9,0.99)\" d_coef=2 (override --learning_rate / --weight_decay); a bare comma "
                        "list is a tuple, as in musubi-tuner: betas=0.9,0.999")
    g.add_argument("--loraplus_lr_ratio", type=float, default=1.0, metavar="R",
                   help="LoRA+ (Hayou et al. 2024; musubi-tuner's --network_args loraplus_lr_ratio=R): LoRA's B (up) "
                        "matrices train at R x --learning_rate, the A (down) matrices and a DoRA's magnitude at it; "
                        "the schedule scales both, the log shows the base rate. Default 1: off (the paper: 2-16). "
                        "--lora_type lora or dora; not with Prodigy / D-Adaptation, which take one rate")
    g.add_argument("--network_dropout", type=float, default=0.0, metavar="P",
                   help="dropout on the LoRA's rank activations in training (musubi-tuner's --network_dropout, "
                        "ai-toolkit's network.dropout; kohya's LoRA): each step zeroes that share of lora_down(x) and "
                        "scales the rest by 1/(1-P) before lora_up; validation and inference run without it. In "
                        "[0, 1), e.g. 0.1; default 0: off. --lora_type lora only")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                   help="decay after --lr_warmup_steps, counted in optimizer steps")
    g.add_argument("--lr_min_ratio", type=float, default=SHAPE_OPTIONS["lr_min_ratio"][0],
                   help="the decaying schedules end at this fraction of --learning_rate (default 0)")
    g.add_argument("--lr_num_cycles", type=int, default=SHAPE_OPTIONS["lr_num_cycles"][0],
                   help="cosine_with_restarts: number of cosine cycles")
    g.add_argument("--lr_power", type=float, default=SHAPE_OPTIONS["lr_power"][0],
                   help="polynomial: the decay's power")
    g.add_argument("--timestep_sampling", choices=SAMPLERS, default="diffsynth",
                   help="how noise levels are drawn (default diffsynth: uniform over the 1000 shifted steps)")
    g.add_argument("--weighting_scheme", choices=WEIGHTINGS, default="bell",
                   help="loss weight per noise level (default bell, DiffSynth's)")
    g.add_argument("--logit_mean", type=float, default=SHAPE_OPTIONS["logit_mean"][0],
                   help="logit_normal / shift / qwen_shift: mean")
    g.add_argument("--logit_std", type=float, default=SHAPE_OPTIONS["logit_std"][0],
                   help="logit_normal / shift / qwen_shift: std")
    g.add_argument("--discrete_flow_shift", type=float, default=SHAPE_OPTIONS["discrete_flow_shift"][0],
                   help="--timestep_sampling shift: the shift")
    g.add_argument("--min_timestep", type=float, default=None, help="lowest timestep drawn, 0..1000")
    g.add_argument("--max_timestep", type=float, default=None, help="highest timestep drawn, 0..1000")
    g.add_argument("--ema_decay", type=float, default=None,
                   help="keep an EMA of the trained weights (e.g. 0.999), saved as <checkpoint>-ema.safetensors")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="train this fraction of samples on the empty prompt (for true-CFG-friendly LoRAs)")
    g.add_argument("--lora_type", choices=LORA_TYPES, default="lora",
                   help="adapter family (peft): lora, loha, lokr or dora")
    g.add_argument("--report_to", action="append", default=None, metavar="TRACKER",
                   help="csv (always written), tensorboard, wandb, swanlab; comma list or repeat the flag. "
                        "Offline: WANDB_MODE=offline, SWANLAB_MODE=local")
    g.add_argument("--tracker_project_name", default=TRACKER_PROJECT,
                   help="project name for tensorboard / wandb / swanlab")


def check_optimizer_installed(name: str):
    """The optimizer's package is installed (found without importing it: torch and friends load slowly)."""
    if name in OPTIMIZERS:
        module, _, extra, package = OPTIMIZERS[name]
        if package and importlib.util.find_spec(module.split(".")[0]) is None:
            raise OptimizerError(missing_package_message(f"--optimizer {name}", package, extra))
        return
    module = name.rpartition(".")[0]
    if not module:
        raise OptimizerError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)} or the import path of a "
                             "torch.optim.Optimizer subclass, e.g. torch.optim.RAdam")
    try:
        found = importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise OptimizerError(f"--optimizer {name}: module {module.split('.')[0]!r} is not installed")


def check_training_options(args) -> list[str]:
    """Problems with the flags above (and resolves --optimizer_args to a dict and --report_to to a list)."""
    problems = []
    try:
        if not isinstance(args.optimizer_args, dict):
            args.optimizer_args = parse_optimizer_args(args.optimizer_args)
        check_optimizer_installed(args.optimizer)
    except OptimizerError as e:
        problems.append(str(e))
    if isinstance(args.optimizer_args, dict) and args.optimizer_args.get("relative_step"):
        problems.append("--optimizer_args relative_step=True: Adafactor's own time-dependent rate has no learning rate "
                        "for the lr schedule to drive or the log to show; leave it out (a fixed --learning_rate, "
                        "as in diffusers', ai-toolkit's and musubi-tuner's Adafactor recipes)")
    # the schedule-free optimizers, by name or by import path (schedulefree.SGDScheduleFree, ...)
    schedule_free = args.optimizer == "adamw_schedulefree" or args.optimizer.startswith("schedulefree.")
    if args.lr_scheduler != "constant" and schedule_free:
        problems.append(f"--optimizer {args.optimizer} replaces the lr schedule (that is its point): use "
                        "--lr_scheduler constant, with --lr_warmup_steps if you want a warm-up")
    if not 0.0 <= args.lr_min_ratio <= 1.0:
        problems.append(f"--lr_min_ratio must be in [0, 1] (got {args.lr_min_ratio})")
    if args.lr_num_cycles < 1 or args.lr_power <= 0:
        problems.append("--lr_num_cycles must be >= 1 and --lr_power > 0")
    if args.logit_std <= 0 or args.discrete_flow_shift <= 0:
        problems.append("--logit_std and --discrete_flow_shift must be > 0")
    low, high = args.min_timestep, args.max_timestep
    for name, value in (("min_timestep", low), ("max_timestep", high)):
        if value is not None and not 0 <= value <= 1000:
            problems.append(f"--{name} must be in [0, 1000] (got {value})")
    if (low is not None or high is not None) and (low or 0) >= (1000 if high is None else high):
        # one bound alone meets the other's default (0, 1000): an empty range draws one noise level only
        problems.append(f"--min_timestep {0 if low is None else low} must be below --max_timestep "
                        f"{1000 if high is None else high}")
    for flag, (default, user, used) in SHAPE_OPTIONS.items():
        if getattr(args, flag) != default and not used(args):
            problems.append(f"--{flag} {getattr(args, flag)} would do nothing here: it shapes {user} only (add "
                            f"that, or leave --{flag} out)")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        problems.append(f"--ema_decay must be in (0, 1), e.g. 0.999 (got {args.ema_decay})")
    if not 0.0 <= args.caption_dropout_rate <= 1.0:
        problems.append(f"--caption_dropout_rate must be in [0, 1] (got {args.caption_dropout_rate})")
    if args.lora_type != "lora" and args.lora_base_model is None:
        problems.append(f"--lora_type {args.lora_type} needs --lora_base_model dit")
    problems += _loraplus_problems(args)
    p = args.network_dropout
    if not (math.isfinite(p) and 0 <= p < 1):
        problems.append(f"--network_dropout must be in [0, 1) (got {p}): the share of the LoRA's rank activations "
                        "dropped in each step, e.g. 0.1; 0 turns it off")
    elif p and args.lora_base_model is None:
        problems.append("--network_dropout drops LoRA activations: it needs --lora_base_model dit (without it the whole "
                        "DiT is fine-tuned)")
    elif p and args.lora_type != "lora":
        problems.append(f"--network_dropout is implemented for --lora_type lora only, not {args.lora_type}: the "
                        f"trainer's own LoRA forward applies it, and peft's {args.lora_type} layers run peft's forward "
                        "(which would skip it): use --lora_type lora, or leave it out")
    fp8 = [f"--{flag}" for flag in ("enable_fp8_training", "fp8_compute") if getattr(args, flag)]
    if args.lora_type == "dora" and fp8:  # --fp8_compute stores the weights in fp8 too
        problems.append(f"--lora_type dora reads the base weights' norms in every step; it does not work with the fp8 "
                        f"weights of {' and '.join(fp8)} (use lora, loha or lokr with fp8)")
    if args.lora_type != "lora" and args.export_format:
        from ..lora.adapters import FORMATS_BY_TYPE

        formats = list(FORMATS_BY_TYPE[args.lora_type])
        if args.export_format not in formats + ["none"]:
            problems.append(f"--export_format {args.export_format} cannot hold a {args.lora_type} (diffusers loads LoRA "
                            "and DoRA only; DiffSynth-Studio reads lora_A/lora_B only): use " + " or ".join(formats))
    args.report_to = [t.strip() for item in (args.report_to or ["csv"]) for t in item.split(",") if t.strip()]
    for tracker in args.report_to:
        if tracker == "none":
            continue
        if tracker not in TRACKERS:
            problems.append(f"--report_to {tracker}: choose from {', '.join(TRACKERS)} (several: a comma list)")
        elif TRACKERS[tracker] and importlib.util.find_spec(TRACKERS[tracker][0]) is None:
            problems.append(missing_package_message(f"--report_to {tracker}", *TRACKERS[tracker]))
    if args.tracker_project_name != TRACKER_PROJECT and not trackers(args):
        problems.append(f"--tracker_project_name {args.tracker_project_name} would do nothing: it names the project "
                        "of --report_to tensorboard, wandb or swanlab (the csv log has none); add one of them")
    return problems


def _loraplus_problems(args) -> list[str]:
    ratio = args.loraplus_lr_ratio
    if not (math.isfinite(ratio) and ratio > 0):
        return [f"--loraplus_lr_ratio must be > 0 (got {ratio}); 1 turns LoRA+ off"]
    if ratio == 1:
        return []
    if args.lora_base_model is None:
        return ["--loraplus_lr_ratio sets the rate of LoRA's B matrices: it needs --lora_base_model dit (without it "
                "the whole DiT is fine-tuned)"]
    if args.lora_type in ("loha", "lokr"):
        # LyCORIS, musubi-tuner and ai-toolkit give LoHa / LoKr factors one rate: no factor is LoRA+'s "B"
        return [f"--loraplus_lr_ratio: a {args.lora_type} has no B (up) matrix for LoRA+ to speed up (its factors "
                "are products, and LyCORIS trains them at one rate): use --lora_type lora or dora, or leave it out"]
    # Prodigy and D-Adaptation estimate one step size for all parameters; their step() raises on groups whose rates
    # differ (other than 0), which would stop the run after the models loaded
    if args.optimizer == "prodigy" or args.optimizer.startswith(("prodigyopt.", "dadaptation.")):
        return [f"--loraplus_lr_ratio {ratio:g} gives LoRA's B matrices their own learning rate, and --optimizer "
                f"{args.optimizer} takes one rate for all parameters (it raises on groups with different rates): "
                "use another optimizer (adamw, adamw8bit, lion, ...), or leave out --loraplus_lr_ratio"]
    return []


def trackers(args) -> list[str]:
    """The accelerate trackers the run logs to (csv is the trainer's own log and always written)."""
    return [t for t in dict.fromkeys(args.report_to) if t not in ("csv", "none")]
