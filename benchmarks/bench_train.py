"""Training benchmark: seconds per optimizer step and peak memory of the real trainer (the code path of
train.py / train_merged_qkv.py), merged vs standard DiT, with and without the conditioning cache, gradient
checkpointing and fp8 base weights, batch 1 vs 4.

A baseline (merged DiT, conditioning cache, batch 1) and one-factor-at-a-time variations of it, plus the standard
DiT at batch 1 and 4. The model set is the tiny random text encoder / VAE / processor of `write_tiny_models` plus
a bigger DiT in the official layout under its own model id (its text width is the tiny text encoder's); the data
are synthetic edit pairs of one size. Every configuration trains in its own process, so peak memory is per
configuration: peak RSS (getrusage in the child; Linux) and, on CUDA, torch.cuda.max_memory_allocated. The children are
forked from a server that has already imported torch and the trainer, so a configuration costs its training, not
an interpreter start. Seconds per step come from the trainer's own train_log.csv (warm-up steps excluded).

    python benchmarks/bench_train.py                  # --preset cpu: width 1024 (8 x 128), 2 blocks, 256x256
    python benchmarks/bench_train.py --preset toy     # the tiny test DiT: checks the script, measures nothing
    python benchmarks/bench_train.py --configs baseline,fp8 --steps 10 --rounds 2
"""
import argparse
import csv
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import namedtuple

from diffsynth.utils.benchmarking import command_line, cpu_name, section_markers, write_section

START, END = section_markers("bench_train")

# samples: distinct edit pairs, all of one size so that a batch of 4 is one bucket (repeated to fill the steps).
PRESETS = {
    # Width 1024 and 2 blocks: the DiT's matmuls, not Python overhead, dominate a step on 2 CPU cores, and the
    # whole run stays a few minutes. The real model is 24 x 128 = 3072 wide with 60 blocks.
    "cpu": dict(num_layers=2, heads=8, head_dim=128, size=256, edit_area=256 * 256, rank=32, warmup=2, steps=5,
                samples=4),
    # The tiny test DiT: checks that the script works; its timings mean nothing.
    "toy": dict(num_layers=2, heads=2, head_dim=32, size=64, edit_area=64 * 64, rank=4, warmup=1, steps=2,
                samples=1),
}
ROPE_AXES = {128: (16, 56, 56), 32: (8, 12, 12)}  # (frames, height, width) summing to the head dim

Config = namedtuple("Config", "label merged batch cached flags")
CONFIGS = {
    "baseline": Config("merged, cached, batch 1 (baseline)", True, 1, True, []),
    "standard": Config("standard, cached, batch 1", False, 1, True, []),
    "uncached": Config("merged, uncached, batch 1", True, 1, False, []),
    "grad_ckpt": Config("merged, cached, batch 1, gradient checkpointing", True, 1, True,
                        ["--use_gradient_checkpointing"]),
    "fp8": Config("merged, cached, batch 1, fp8 base weights", True, 1, True, ["--enable_fp8_training"]),
    "batch4": Config("merged, cached, batch 4", True, 4, True, []),
    "standard_batch4": Config("standard, cached, batch 4", False, 4, True, []),
}

BENCH_DIT_ID = "bench/Qwen-Image-Edit-{preset}"  # the bigger DiT's own model id under the models folder
TEXT_ENCODER = "tiny-random/Qwen-Image:text_encoder/model*.safetensors"
VAE = "tiny-random/Qwen-Image:vae/diffusion_pytorch_model.safetensors"
PROCESSOR = "tiny-random/Qwen-Image-Edit/processor"
# What the fork server imports once; every configuration's process starts with these already loaded.
PRELOAD = ["matplotlib.pyplot", "diffsynth.trainers.trainer", "diffsynth.pipelines.qwen_image",
           "diffsynth.utils.tiny_models"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model and image size (see above)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from the timing (default: preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default: preset's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, in a rotating order, pooling the step times")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=None,
                   help="models, data, cache and each run's output folder (default: a temporary folder, deleted)")
    p.add_argument("--output", default="BENCHMARKS.md",
                   help="markdown file whose bench_train section is rewritten; '' writes none")
    p.add_argument("--note", default="", help="a sentence added under the table (e.g. 'the machine was busy')")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("warmup", "steps", "rank"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.configs = [c for c in args.configs.split(",") if c]
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    if "baseline" not in args.configs:
        p.error("--configs must include baseline: every ratio is to it")
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1 or args.rank < 1:
        p.error("--warmup must be >= 0 and --steps, --rounds, --rank >= 1")
    return args


# ---- children (each in its own process) -----------------------------------------------------------------------

def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def model_ids(preset):
    return ",".join([f"{BENCH_DIT_ID.format(preset=preset)}:transformer/diffusion_pytorch_model*.safetensors",
                     TEXT_ENCODER, VAE])


def trainer_argv(args, work, config, out):
    """The flags a user would give train.py / train_merged_qkv.py for this configuration."""
    preset = PRESETS[args.preset]
    total = args.warmup + args.steps
    argv = ["--dataset_base_path", os.path.join(work, "data"),
            "--dataset_metadata_path", os.path.join(work, "data", "metadata.csv"),
            "--model_id_with_origin_paths", model_ids(args.preset), "--models_dir", os.path.join(work, "models"),
            "--processor_path", os.path.join(work, "models", PROCESSOR),
            "--max_pixels", str(preset["size"] ** 2), "--edit_image_area", str(preset["edit_area"]),
            # enough repeats that every step is in epoch 1: no end-of-epoch checkpoint lands between two steps
            "--dataset_repeat", str(math.ceil(config.batch * total / preset["samples"])),
            "--batch_size", str(config.batch), "--max_steps", str(total), "--seed", str(args.seed),
            "--lora_base_model", "dit", "--lora_rank", str(args.rank), "--output_path", out, *config.flags]
    if config.cached:
        argv += ["--cache_conditioning", os.path.join(work, "cache")]
    return argv


def prepare(job):
    """Model set, data and conditioning cache; -> facts for the report."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from diffsynth.trainers import Trainer, parse_args as trainer_args
    from diffsynth.utils.demo_data import write_edit_dataset
    from diffsynth.utils.tiny_models import TINY_DIT_CONFIG, write_tiny_models

    preset, work, seed = PRESETS[job["preset"]], job["work"], job["seed"]
    models = os.path.join(work, "models")
    write_tiny_models(models, seed=seed)
    # The text width must be the text encoder's, which is the tiny one's.
    dit_config = dict(num_layers=preset["num_layers"], num_attention_heads=preset["heads"],
                      attention_head_dim=preset["head_dim"], axes_dims_rope=ROPE_AXES[preset["head_dim"]],
                      joint_attention_dim=TINY_DIT_CONFIG["joint_attention_dim"], in_channels=64, out_channels=16)
    torch.manual_seed(seed)
    dit = QwenImageTransformer2DModel(**dit_config)
    dit_dir = os.path.join(models, BENCH_DIT_ID.format(preset=job["preset"]), "transformer")
    shutil.rmtree(dit_dir, ignore_errors=True)
    dit.save_pretrained(dit_dir, safe_serialization=True)  # the official layout, as the real repo has it
    write_edit_dataset(os.path.join(work, "data"), num_samples=preset["samples"], size=(preset["size"],) * 2, seed=seed)
    # Fill the cache with the trainer's own code, so the cached runs load only the DiT.
    trainer = Trainer(trainer_args(job["argv"], merged_qkv=True))
    trainer.setup()
    cond = trainer.cache.get(trainer.dataset.samples[0].cache_key)
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dit_params": sum(p.numel() for p in dit.parameters()), "text_dim": dit_config["joint_attention_dim"],
        "text_tokens": cond["prompt_emb"].shape[0], "target_tokens": cond["latents"].shape[0],
        "edit_tokens": cond["edit_latents"].shape[0],
    }


def peak_memory():
    """(peak RSS MB, peak CUDA MiB or None) since the process started or the last reset_peak_memory()."""
    import resource

    import torch

    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, cuda  # maxrss is in KiB on Linux


def reset_peak_memory() -> bool:
    """Start a new peak. Linux resets the peak RSS (VmHWM, maxrss) when 5 is written to clear_refs; False where
    that is not possible, and the training-steps peak is then unknown."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_memory()[0] <= _rss_mb() + 16  # it worked: the peak is now about the current RSS


def train(job):
    """The trainer as train.py runs it (setup, then the loop), with the peak memory of each phase. Peaks are
    split because loading is not training: e.g. fp8 converts weights loaded in full precision, so the whole-run
    peak includes those; the steps' peak is what training itself holds."""
    from diffsynth.trainers import Trainer, parse_args as trainer_args

    start_rss = _rss_mb()
    trainer = Trainer(trainer_args(job["argv"], merged_qkv=job["merged"]))
    trainer.setup()
    from diffsynth.utils.fp8 import weight_bytes

    dit_mb = weight_bytes(trainer.accelerator.unwrap_model(trainer.dit)) / 2**20
    setup_rss, setup_cuda = peak_memory()
    reset = reset_peak_memory()
    trainer.train()
    steps_rss, steps_cuda = peak_memory()
    return {"dit_weight_mb": dit_mb, "start_rss_mb": start_rss, "setup_rss_mb": setup_rss, "steps_rss_mb": steps_rss if reset else None,
            "rss_mb": max(setup_rss, steps_rss), "steps_cuda_mb": steps_cuda,
            "cuda_mb": None if steps_cuda is None else max(setup_cuda or 0.0, steps_cuda)}


def child(kind, job, result_path):
    """Entry point of every child process."""
    import torch

    from diffsynth.utils.io import write_json_atomic

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    write_json_atomic({"prepare": prepare, "train": train}[kind](job), result_path)


# ---- parent ---------------------------------------------------------------------------------------------------

def run_child(ctx, kind, job, what):
    """Run one job in a fresh process forked from the server; -> its result dict."""
    result_path = os.path.join(job["work"], "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    start = time.perf_counter()
    process = ctx.Process(target=child, args=(kind, job, result_path))
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(f"bench_train: {what} failed (exit code {process.exitcode}); its messages are above")
    print(f"[bench_train] {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    with open(result_path) as f:
        return json.load(f)


def step_seconds(log_path, warmup):
    """Seconds of each step after the warm-up, from the trainer's log (its `seconds` column is cumulative)."""
    with open(log_path) as f:
        cumulative = [float(row["seconds"]) for row in csv.DictReader(f)]
    steps = [b - a for a, b in zip([0.0] + cumulative, cumulative)]
    return steps[warmup:]


def run(args):
    """-> (facts from the preparation, {config: {"times": timed step seconds of all rounds, "runs": [results]}})."""
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench_train-"))
    os.makedirs(work, exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    common = dict(work=work, threads=args.threads, preset=args.preset, seed=args.seed)
    results = {name: {"times": [], "runs": []} for name in args.configs}
    try:
        args.load_start = os.getloadavg()[0]
        print(f"[bench_train] model set, data and conditioning cache in {work}", file=sys.stderr, flush=True)
        argv = trainer_argv(args, work, CONFIGS["baseline"], os.path.join(work, "runs", "prepare"))
        info = run_child(ctx, "prepare", {**common, "argv": argv}, "preparation")
        for r in range(args.rounds):
            k = r % len(args.configs)  # rotate the order each round, so drift does not always hit the same config
            for name in args.configs[k:] + args.configs[:k]:
                config = CONFIGS[name]
                out = os.path.join(work, "runs", f"{name}-round{r + 1}")
                shutil.rmtree(out, ignore_errors=True)
                job = {**common, "argv": trainer_argv(args, work, config, out), "merged": config.merged}
                res = run_child(ctx, "train", job, f"round {r + 1}, {name} ({config.label}), output {out}")
                times = step_seconds(os.path.join(out, "train_log.csv"), args.warmup)
                if len(times) != args.steps:
                    sys.exit(f"bench_train: {out}/train_log.csv has {len(times) + args.warmup} steps, "
                             f"expected {args.warmup + args.steps}")
                results[name]["times"] += times
                results[name]["runs"].append(res)
        args.load_end = os.getloadavg()[0]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return info, results


# ---- report ---------------------------------------------------------------------------------------------------

def median(results, name):
    return statistics.median(results[name]["times"])


def peak(results, name, key):
    """The largest of a memory figure over the rounds; None where it was not measured."""
    values = [run[key] for run in results[name]["runs"] if run[key] is not None]
    return max(values) if values else None


def spread(times):
    m = statistics.median(times)
    return (max(times) - min(times)) / m if m > 0 else 0.0


def ratio(results, name, other="baseline"):
    if name not in results or other not in results or median(results, other) <= 0:
        return None
    return median(results, name) / median(results, other)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_table(results):
    cuda = any(peak(results, name, "cuda_mb") is not None for name in results)
    head = ("| config | s/step median | s/step min | x baseline | s/sample | DiT weights MB | peak RSS MB, steps "
            "| peak RSS MB, run |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if cuda:
        head, rule = head + " peak CUDA MiB, steps | peak CUDA MiB, run |", rule + "---:|---:|"
    lines = [head, rule]
    for name, r in results.items():
        config, med = CONFIGS[name], median(results, name)
        memory = ("dit_weight_mb", "steps_rss_mb", "rss_mb") + (("steps_cuda_mb", "cuda_mb") if cuda else ())
        lines.append(f"| {config.label} | {med:.2f} | {min(r['times']):.2f} | {fmt(ratio(results, name))} | "
                     f"{med / config.batch:.2f} | " + " | ".join(fmt(peak(results, name, k), 0) for k in memory) + " |")
    return "\n".join(lines)


def compare(x, noise):
    """x: a time ratio. Differences within the timing noise are not called differences."""
    if abs(x - 1) <= noise:
        return f"within the timing noise of +-{noise:.0%}"
    return f"{abs(1 - x):.0%} {'slower' if x > 1 else 'faster'}"


def findings(results, info, args):
    """What each ratio shows; the measured numbers decide the wording."""
    noise = max(0.03, max(spread(r["times"]) for r in results.values()) / 2)

    def mem(name, phase="steps_"):
        """(peak, unit) on the trainer's device (CUDA where measured, else RSS) over the steps, or the run ('')."""
        for key, unit in ((phase + "cuda_mb", "MiB CUDA"), (phase + "rss_mb", "MB RSS"), ("rss_mb", "MB RSS")):
            if peak(results, name, key) is not None:
                return peak(results, name, key), unit

    def said(name, phase="steps_"):
        value, unit = mem(name, phase)
        return f"{value:.0f} {unit}"

    out = []
    pairs = [(b, ratio(results, m, s)) for b, m, s in ((1, "baseline", "standard"), (4, "batch4", "standard_batch4"))]
    pairs = [(b, x) for b, x in pairs if x is not None]
    if pairs:
        out.append("Merged vs standard DiT: " + "; ".join(
            f"merged/standard = {x:.2f} at batch {b} ({compare(x, noise)})" for b, x in pairs)
            + ". Both do the same matmul FLOPs on the same frozen weights; the merged LoRA on to_qkv shares one A "
            "for q, k and v, so it trains fewer LoRA parameters.")
    x = ratio(results, "uncached")
    if x is not None:
        out.append(f"Conditioning cache: an uncached step takes {x:.2f}x a cached one ({compare(x, noise)}); peak "
                   f"memory over the steps {said('uncached')} vs {said('baseline')}. The text encoder and VAE here "
                   f"are the tiny random ones (text width {info['text_dim']}), so this UNDERSTATES the cache's "
                   "gain: with the real 7B Qwen2.5-VL text encoder (about 16 GB in bf16) and VAE, every uncached "
                   "step runs a 7B forward pass over the prompt and the edit image, and a cached run never loads "
                   "either model.")
    x = ratio(results, "grad_ckpt")
    if x is not None:
        out.append(f"Gradient checkpointing: {x:.2f}x the baseline's time ({compare(x, noise)}; the backward "
                   f"recomputes each block's forward); peak memory over the steps {said('grad_ckpt')} vs "
                   f"{said('baseline')}. With {PRESETS[args.preset]['num_layers']} blocks the activations it frees "
                   "are small next to the weights; the saving grows with the depth (60 blocks in the real model).")
    x = ratio(results, "fp8")
    if x is not None:
        (f8, unit), (base, _) = mem("fp8"), mem("baseline")
        text = (f"fp8 base weights: {x:.2f}x the baseline's time ({compare(x, noise)}); peak memory over the steps "
                f"{f8:.0f} vs {base:.0f} {unit}, whole run {said('fp8', '')} vs {said('baseline', '')} (the "
                f"DiT's weights are {info['dit_params'] * 4 / 2**20:.0f} MB in fp32). fp8 stores the frozen linear "
                "weights in 1 byte and upcasts each one on every call: the matmuls run in the compute dtype, so it "
                "cannot save time, and its loading peak includes the full-precision weights it converts.")
        w8, w = peak(results, "fp8", "dit_weight_mb"), peak(results, "baseline", "dit_weight_mb")
        text += (f" The DiT's parameters and buffers (LoRA included) take {w8:.0f} MB with fp8 vs {w:.0f} MB "
                 f"without ({w8 / w:.2f}x).")
        text += (f" Over the steps the process peak is {base - f8:.0f} {unit} lower." if f8 < base else
                 " The process peak RSS does not show that saving here: it also holds what loading the "
                 "full-precision weights left behind, and the per-call upcast copies.")
        out.append(text)
    for name, one in (("batch4", "baseline"), ("standard_batch4", "standard")):
        if name in results and one in results and median(results, one) > 0:
            x = median(results, name) / 4 / median(results, one)
            out.append(f"Batch 4 ({'merged' if one == 'baseline' else 'standard'}): {x:.2f}x the batch-1 time per "
                       f"sample ({compare(x, noise)}); peak memory over the steps {said(name)} vs {said(one)}.")
    worst = max(results, key=lambda n: spread(results[n]["times"]))
    out.append(f"The largest step-to-step spread, (max - min) / median, was {spread(results[worst]['times']):.0%} "
               f"({CONFIGS[worst].label}): ratios within half of it of 1 are not called differences."
               + (" With one round the spread is that within a process only; rerun with --rounds 2 or more before "
                  "quoting a small ratio." if args.rounds == 1 else ""))
    return out


def render(args, info, results, argv):
    cmd = command_line("bench_train.py", argv, hidden=("--output", "--work_dir"))
    preset = PRESETS[args.preset]
    machine = (f"{cpu_name()}, {os.cpu_count()} cores visible, torch {info['torch']} ({info['threads']} threads), "
               f"Python {platform.python_version()}")
    if info["cuda"]:
        machine = f"{info['cuda']} (the trainer's device); host " + machine
    starts = [run["start_rss_mb"] for r in results.values() for run in r["runs"]]
    text = [
        START,
        "## Training: seconds per step and peak memory of the trainer (`benchmarks/bench_train.py`)",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine}; 1-minute load average {args.load_start:.1f} at start, {args.load_end:.1f} at end.",
        f"- Model: DiT {preset['num_layers']} blocks, {preset['heads']} heads x {preset['head_dim']} = width "
        f"{preset['heads'] * preset['head_dim']}, text width {info['text_dim']} ({info['dit_params'] / 1e6:.1f}M "
        "parameters, random, official file layout), with the tiny random text encoder and VAE of "
        f"`write_tiny_models`. LoRA rank {args.rank} on the trainer's default targets; "
        + ("bf16 mixed precision" if info["cuda"] else "fp32") + " (the trainer's `--mixed_precision auto`).",
        f"- Data: {preset['samples']} synthetic edit pairs of {preset['size']}x{preset['size']}, `--edit_image_area "
        f"{preset['edit_area']}`: {info['target_tokens']} target + {info['edit_tokens']} edit-image + "
        f"{info['text_tokens']} text tokens per sample (the text includes the edit image as the VL model sees it).",
        f"- Method: each configuration runs the real trainer (`Trainer.setup()` then `.train()`, as train.py / "
        f"train_merged_qkv.py do) in its own process; {args.warmup} warm-up + {args.steps} timed optimizer steps "
        f"x {args.rounds} round(s); seconds per step are differences of train_log.csv's cumulative `seconds` "
        "(0.01 s resolution), so they include data loading and logging. Peak RSS (getrusage maxrss of the child) "
        "is given for the training steps (the peak is reset after setup, so model loading is excluded; it "
        "includes the final checkpoint save) and for the whole run; both include the imported libraries, about "
        f"{statistics.median(starts):.0f} MB at a child's start"
        + ("; peak CUDA is torch.cuda.max_memory_allocated, split the same way." if info["cuda"] else "."),
        "",
        fmt_table(results),
        "",
        " ".join(findings(results, info, args)),
    ]
    if args.note:
        text += ["", args.note]
    text.append(END)
    return "\n".join(text) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    info, results = run(args)
    section = render(args, info, results, argv)
    print(section)
    if args.output:
        write_section(args.output, "bench_train", section)
        print(f"wrote the bench_train section of {args.output}")


if __name__ == "__main__":
    main()
