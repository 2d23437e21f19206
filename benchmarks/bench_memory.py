"""Memory benchmark: peak GPU memory and step time of the full merged DiT (60 blocks) in a LoRA training step with
gradient checkpointing, bf16 and fp8 storage x --blocks_to_swap, next to the VRAM planner's prediction for each
row; the flags the planner picks for 80 GB (fewer checkpointed blocks, attention outputs kept), 24 GB and 16 GB
cards; and one 1024x1024 edit denoising step (two DiT passes, true CFG) with block swap.

The DiT is built directly on the GPU (meta device, then the weights allocated there and filled with random values
of a sane scale): never a full-precision 20B model in host memory. Every row starts from the same LoRA weights and
feeds the same inputs, so the losses of a swapped row must equal the all-resident row's (the table says how close
they are). Peak memory is torch.cuda.max_memory_allocated over the timed steps, after a warm-up step has allocated
the optimizer state (the planner's "steady state"). Not included: the text encoder and the VAE (random
conditioning stands in for them).

    python benchmarks/bench_memory.py                         # CUDA, 60 blocks, 1024x1024: about 2 minutes on an H100
    python benchmarks/bench_memory.py --preset tiny           # CPU, tiny DiT: checks the script, measures nothing
"""
import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from diffsynth.lora import inject_lora
from diffsynth.models import QwenImageDiTMergedQKV
from diffsynth.utils import vram_planner as vp
from diffsynth.utils.benchmarking import checkpointing_spec, command_line, cpu_name, section_markers, write_section
from diffsynth.utils.fp8 import enable_fp8_linear

PRESETS = {
    # the measuring stick: 1024x1024 edit (4096 target + 4096 edit-image tokens), 160 text tokens, r=32
    "gpu": dict(config=vp.QWEN_IMAGE_DIT, size=1024, text_len=160, rank=32, swaps=(0, 8, 16, 32), budgets=(80, 24, 16),
                inference_budget=16, device="cuda", dtype=torch.bfloat16, warmup=1, steps=2),
    # a tiny DiT with 4 blocks on the CPU: the same code path, its numbers mean nothing (no diffusers import: the GPU
    # machine has none)
    "tiny": dict(config=dict(num_layers=4, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                             joint_attention_dim=64, in_channels=64, out_channels=16), size=64, text_len=8, rank=4, swaps=(0, 1, 2, 3),
                 budgets=(), inference_budget=None, device="cpu", dtype=torch.float32, warmup=1, steps=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=list(PRESETS))
    p.add_argument("--swaps", default=None, help="comma list of --blocks_to_swap values (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (>= 1: the optimizer state exists)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--budget_s", type=float, default=None,
                   help="stop starting new rows after this many seconds (what ran is still reported)")
    p.add_argument("--inference_swap", type=int, default=None,
                   help="blocks swapped in the inference row (default: the fewest the planner fits in 16 GB)")
    p.add_argument("--checkpointed", default="",
                   help="comma list: extra bf16 rows checkpointing only the last N blocks (--blocks_to_checkpoint N), "
                        "keeping the attention outputs (selective: --selective_checkpointing) or both (N+selective), "
                        "besides the planner's picks")
    p.add_argument("--weights", default="bf16,fp8", help="comma list of the training rows' weights: bf16, fp8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--section", default="bench_memory", help="name of the BENCHMARKS.md section")
    p.add_argument("--output", default="BENCHMARKS.md",
                   help="markdown file whose bench_memory section is rewritten; '' writes none")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.swaps = tuple(int(x) for x in args.swaps.split(",")) if args.swaps else preset["swaps"]
    layers = PRESETS[args.preset]["config"]["num_layers"]
    rows = []
    for item in (x.strip() for x in args.checkpointed.split(",") if x.strip()):
        try:
            blocks, selective = checkpointing_spec(item)
        except ValueError:
            p.error(f"--checkpointed {item}: a block count, selective, or both joined by + (e.g. 34+selective)")
        if blocks is not None and not 0 < blocks <= layers:
            p.error(f"--checkpointed: each count between 1 and the preset's {layers} blocks")
        rows.append((blocks, selective))
    args.checkpointed = tuple(rows)
    args.weights = tuple(w.strip() for w in args.weights.split(",") if w.strip())
    if not args.weights or set(args.weights) - {"bf16", "fp8"}:
        p.error(f"--weights: a comma list of bf16 and fp8, got {','.join(args.weights)!r}")
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    args.steps = preset["steps"] if args.steps is None else args.steps
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        p.error("the gpu preset needs CUDA; --preset tiny runs on the CPU")
    return args


# ---- the model --------------------------------------------------------------------------------------------------

def build_dit(preset, seed):
    """The DiT allocated on the device in the compute dtype, random weights scaled so that activations stay finite."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(preset["dtype"])
    try:
        with torch.device("meta"):
            dit = QwenImageDiTMergedQKV(**preset["config"])
    finally:
        torch.set_default_dtype(default)
    dit.to_empty(device=preset["device"])
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)  # norm weights
    return dit.requires_grad_(False).eval()


def inputs(preset, device, dtype, seed):
    h = w = preset["size"] // 16
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2 * h * w, 64, generator=g).to(device, dtype)
    text = torch.randn(1, preset["text_len"], preset["config"]["joint_attention_dim"], generator=g).to(device, dtype)
    t = torch.rand(1, generator=g).to(device)
    target = torch.randn(1, h * w, 64, generator=g).to(device)
    return x, text, t, [[(1, h, w), (1, h, w)]], target


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(preset):
    return torch.autocast("cuda", dtype=preset["dtype"]) if preset["device"] == "cuda" else torch.autocast(
        "cpu", enabled=False)


def place(dit, device, swap):
    """All blocks back on the device, then `swap` of them out to pinned host memory."""
    dit.disable_block_swap()
    dit.to(device)
    if swap:
        dit.enable_block_swap(swap, device)


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ---- rows ---------------------------------------------------------------------------------------------------------

def train_row(dit, preset, args, swap, fp8, lora_init, counts, checkpointed=None, selective=False):
    device = preset["device"]
    dit.enable_gradient_checkpointing(blocks=checkpointed, keep_attention=selective)
    place(dit, device, swap)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.requires_grad:
                p.copy_(lora_init[name])
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x, text, t, shapes, target = inputs(preset, device, preset["dtype"], args.seed)
    losses, times = [], []
    free(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup and device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the warm-up allocated the optimizer state: steady state from here
        sync(device)
        start = time.perf_counter()
        with autocast(preset):
            pred = dit(x, text, None, t, shapes)[:, : target.shape[1]]
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    setup = vp.Setup(batch=1, target_tokens=x.shape[1] // 2, edit_tokens=x.shape[1] // 2, text_tokens=text.shape[1],
                     dtype_bytes=torch.finfo(preset["dtype"]).bits // 8, fp8=fp8, blocks_to_swap=swap,
                     checkpointed_blocks=checkpointed, keep_attention=selective)
    measured = peak_gib(device)
    del optimizer
    return {"kind": "train", "fp8": fp8, "swap": swap, "checkpointed": checkpointed, "selective": selective,
            "seconds": statistics.median(times), "peak": measured, "planned": vp.training_peak(counts, setup).gib(),
            "losses": losses,
            "copies": dit.block_swap.copies if dit.block_swap else 0}


def inference_row(dit, preset, args, swap, counts):
    """One denoising step of an edit with true CFG: two DiT passes without gradients."""
    device = preset["device"]
    place(dit, device, swap)
    x, text, t, shapes, _ = inputs(preset, device, preset["dtype"], args.seed)
    free(device)
    times = []
    with torch.no_grad(), autocast(preset):
        for step in range(2):  # a warm-up step, then the timed one
            if step == 1 and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for _ in range(2):
                dit(x, text, None, t, shapes)
            sync(device)
            times.append(time.perf_counter() - start)
    setup = vp.Setup(batch=1, target_tokens=x.shape[1] // 2, edit_tokens=x.shape[1] // 2, text_tokens=text.shape[1],
                     dtype_bytes=torch.finfo(preset["dtype"]).bits // 8, blocks_to_swap=swap)
    return {"kind": "inference", "fp8": False, "swap": swap, "checkpointed": None, "selective": False,
            "seconds": times[-1],
            "peak": peak_gib(device), "planned": vp.denoising_bytes(counts, setup) / vp.GIB, "losses": None}


def planned_setups(counts, preset):
    """The planner's choice for each budget of the preset (at this benchmark's token counts) that this benchmark
    can run (checkpointing without its offload): [(GiB, Setup)]."""
    tokens = (preset["size"] // 16) ** 2
    base = vp.Setup(target_tokens=tokens, edit_tokens=tokens, text_tokens=preset["text_len"])
    out = []
    for gib in preset["budgets"]:
        fit = vp.cheapest_fit(counts, base, gib * vp.GIB)
        if fit is not None and fit[0].checkpointing and not fit[0].checkpointing_offload:
            out.append((gib, fit[0]))
    return out


def inference_swap(counts, preset):
    """The fewest swapped blocks whose predicted inference peak fits the preset's inference budget."""
    if preset["inference_budget"] is None:
        return counts.num_layers - 1
    tokens = (preset["size"] // 16) ** 2
    for n in range(counts.num_layers + 1):
        s = vp.Setup(target_tokens=tokens, edit_tokens=tokens, text_tokens=preset["text_len"], blocks_to_swap=n)
        if vp.denoising_bytes(counts, s) <= (preset["inference_budget"] - vp.HEADROOM_GIB) * vp.GIB:
            return n
    return counts.num_layers


def run(args, progress=None):
    """-> (rows, plans, skipped, counts, seconds); `progress(same)` is called after every row, so that a run cut
    short (run_gpu.sh's hard time limit) keeps what it measured."""
    preset = PRESETS[args.preset]
    device = preset["device"]
    started = time.perf_counter()
    over = lambda: args.budget_s is not None and time.perf_counter() - started > args.budget_s  # noqa: E731
    merged_targets = vp.DEFAULT_MERGED_TARGETS
    counts = vp.dit_counts(preset["config"], lora_targets=merged_targets, rank=preset["rank"])
    rows, skipped = [], []
    dit = build_dit(preset, args.seed)

    n = inference_swap(counts, preset) if args.inference_swap is None else args.inference_swap
    print(f"[bench_memory] inference, {n} blocks swapped", file=sys.stderr, flush=True)
    rows.append(inference_row(dit, preset, args, n, counts))
    plans = planned_setups(counts, preset)
    report = lambda: progress and progress(rows, plans, skipped, counts, time.perf_counter() - started)  # noqa: E731
    report()

    inject_lora(dit, merged_targets, preset["rank"])
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
                if "lora_B" in name:
                    p.normal_(0, 0.01)  # peft starts B at zero; a non-zero LoRA makes the comparison mean something
    lora_init = {name: p.detach().clone() for name, p in dit.named_parameters() if p.requires_grad}
    dit.enable_gradient_checkpointing()
    dit.train()
    for fp8 in (False, True):
        if ("fp8" if fp8 else "bf16") not in args.weights:
            continue
        if fp8:
            place(dit, device, 0)
            enable_fp8_linear(dit)
        # The planner's picks right after the resident row (the goals' rows come first when time runs short), then
        # the extra checkpointing rows, then the listed swaps; each (swap, checkpointed blocks) once
        picks = [(p.blocks_to_swap, p.checkpointed_blocks, p.keep_attention) for _, p in plans if p.fp8 == fp8]
        extra = [(0, n, selective) for n, selective in args.checkpointed] if not fp8 else []
        configs = list(dict.fromkeys([(s, None, False) for s in args.swaps if s == 0] + picks + extra
                                     + [(s, None, False) for s in args.swaps]))
        for swap, checkpointed, selective in configs:
            what = (f"{'fp8' if fp8 else 'bf16'} swap {swap}" + (f" checkpointed {checkpointed}" if checkpointed else "")
                    + (" selective" if selective else ""))
            if over():
                skipped.append(what)
                continue
            print(f"[bench_memory] training, {what}", file=sys.stderr, flush=True)
            try:
                rows.append(train_row(dit, preset, args, swap, fp8, lora_init, counts, checkpointed, selective))
            except torch.cuda.OutOfMemoryError:
                rows.append({"kind": "train", "fp8": fp8, "swap": swap, "checkpointed": checkpointed,
                             "selective": selective, "oom": True})
                free(device)
            report()
    return rows, plans, skipped, counts, time.perf_counter() - started


# ---- report ---------------------------------------------------------------------------------------------------------

def fmt_rows(rows, plans, device, num_layers):
    resident = {(r["fp8"], r["kind"]): r for r in rows
                if r["kind"] == "train" and r.get("swap") == 0 and r["checkpointed"] is None and not r["selective"]
                and "oom" not in r}
    fp8_base = resident.get((True, "train"))
    plan_of = {(p.fp8, p.blocks_to_swap, p.checkpointed_blocks, p.keep_attention): gib for gib, p in plans}
    lines = ["| run | weights | blocks swapped | blocks checkpointed | s/step | x fp8 resident | peak GiB (measured) | "
             "planner GiB | planner error | max loss diff vs resident |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        weights = "fp8" if r["fp8"] else ("bf16" if device == "cuda" else "fp32")
        checkpointed = "-" if r["kind"] == "inference" else (
            f"{r['checkpointed'] or num_layers}" + (", attention kept" if r["selective"] else ""))
        if r["kind"] == "inference":
            label = "inference: 1 edit step, true CFG (2 DiT passes)"
        else:
            plan = plan_of.get((r["fp8"], r["swap"], r["checkpointed"], r["selective"]))
            plain = r["swap"] == 0 and r["checkpointed"] is None and not r["selective"]  # any budget with room picks
            label = "LoRA step" + (f" ({plan} GB plan)" if plan and not plain else "")
        if r.get("oom"):
            lines.append(f"| {label} | {weights} | {r['swap']} | {checkpointed} | OOM | | | | | |")
            continue
        ratio = f"{r['seconds'] / fp8_base['seconds']:.2f}" if fp8_base and r["kind"] == "train" else "-"
        peak = f"{r['peak']:.2f}" if r["peak"] is not None else "n/a (CPU)"
        error = f"{r['planned'] / r['peak'] - 1:+.1%}" if r["peak"] else "-"
        base = resident.get((r["fp8"], "train"))
        diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.1e}"
                if r["losses"] and base else "-")
        lines.append(f"| {label} | {weights} | {r['swap']} | {checkpointed} | {r['seconds']:.3f} | {ratio} | {peak} | "
                     f"{r['planned']:.2f} | {error} | {diff} |")
    return "\n".join(lines)


def render(args, rows, plans, skipped, counts, seconds, argv):
    preset = PRESETS[args.preset]
    device = preset["device"]
    cmd = command_line("bench_memory.py", argv)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")
    if device == "cuda":
        free_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        machine = f"{torch.cuda.get_device_name()} ({free_gib:.0f} GiB, CUDA {torch.version.cuda}); host " + machine
    tokens = (preset["size"] // 16) ** 2
    text = [
        section_markers(args.section)[0],
        "## Memory: peak GPU memory and step time with block swap and fp8, planner vs measured "
        "(`benchmarks/bench_memory.py`)",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; {seconds:.0f} s in all.",
        f"- Machine: {machine}.",
        f"- Model: merged-QKV DiT, {counts.num_layers} blocks ({counts.total / 1e6:,.1f}M parameters), random weights; "
        f"LoRA r={preset['rank']} on the default targets ({counts.lora / 1e6:.2f}M parameters, fp32, AdamW); "
        f"batch 1, {preset['size']}x{preset['size']} edit = {tokens} target + {tokens} edit-image tokens + "
        f"{preset['text_len']} text tokens; gradient checkpointing in every training row (of every block, or of the "
        "last N: `--blocks_to_checkpoint N`).",
        f"- Method: {args.warmup} warm-up step(s) (the optimizer state is allocated), then {args.steps} timed; peak = "
        "torch.cuda.max_memory_allocated over the timed steps; planner = `diffsynth/utils/vram_planner.py` "
        "(steady state) for the same setup. The text encoder and VAE are not part of any row.",
        "",
        fmt_rows(rows, plans, device, counts.num_layers),
    ]
    if plans:
        text += ["", "Plans: " + "; ".join(f"{gib} GB card: {' '.join(p.flags())}" for gib, p in plans)
                 + " (the planner's cheapest flags at these token counts, with its headroom of "
                 f"{vp.HEADROOM_GIB:.0f} GiB)."]
    if skipped:
        text += ["", f"Not run (--budget_s {args.budget_s:.0f} reached): {', '.join(skipped)}."]
    if device != "cuda":
        text += ["", "CPU run of the tiny preset: it checks that the script works; no number here is a measurement "
                     "of the real model."]
    text.append(section_markers(args.section)[1])
    return "\n".join(text) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def progress(*state):
        if args.output:
            write_section(args.output, args.section, render(args, *state, argv))

    rows, plans, skipped, counts, seconds = run(args, progress)
    section = render(args, rows, plans, skipped, counts, seconds, argv)
    print(section)
    if args.output:
        write_section(args.output, args.section, section)
        print(f"wrote the {args.section} section of {args.output}")


if __name__ == "__main__":
    main()
