"""DiT benchmark: our standard DiT vs our merged-QKV DiT vs diffusers' QwenImageTransformer2DModel.

Same weights in all three; measures (a) a forward pass without grad and (b) one LoRA training step (peft LoRA on
the attention and MLP linears, forward + MSE + backward + AdamW). Variants run interleaved (the order rotates each
round) so that machine drift hits all of them alike; reports median and min seconds and the ratios
merged/standard and ours/diffusers, prints a markdown table and writes it into a section of BENCHMARKS.md.

    python benchmarks/bench_dit.py                                   # CPU fp32, 1 block, 256x256 edit
    python benchmarks/bench_dit.py --device cuda --dtype bf16 --num_layers 2   # 1024x1024 edit on a GPU
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import diffusers
import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV, merge_qkv_state_dict
from diffsynth.utils.benchmarking import cpu_name, section_markers, write_section

VARIANTS = ("standard", "merged", "diffusers")
COMMON_TARGETS = ["to_out.0", "to_add_out",
                  "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
QKV_TARGETS = {
    "standard": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"],
    "merged": ["to_qkv", "add_qkv_proj"],
    "diffusers": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"],
}
START, END = section_markers("bench_dit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--num_layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--text_dim", type=int, default=3584, help="joint_attention_dim (text encoder width)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default 256 on cpu, 1024 on cuda)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: --height)")
    p.add_argument("--text_len", type=int, default=160, help="text tokens")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--modes", default="forward,train", help="comma list of forward, train")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="BENCHMARKS.md",
                   help="markdown file whose bench_dit section is rewritten; '' writes none")
    p.add_argument("--note", default="", help="a sentence added under the table (e.g. 'the machine was busy')")
    args = p.parse_args(argv)
    args.height = args.height or (1024 if args.device == "cuda" else 256)
    args.width = args.width or args.height
    if args.height % 16 or args.width % 16:
        p.error(f"--height/--width must be multiples of 16 (VAE 8x, then 2x2 packing), got {args.height}x{args.width}")
    args.modes = [m for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for m in args.modes:
        if m not in ("forward", "train"):
            p.error(f"unknown mode {m!r}; choose from forward, train")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def rope_axes(head_dim):
    # (16, 56, 56) for 128; any even split summing to head_dim is a valid RoPE layout for smaller toy heads.
    frames = 2 * max(1, head_dim // 16)
    height = 2 * ((head_dim - frames) // 4)
    return frames, height, head_dim - frames - height


def machine(device):
    text = (f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"diffusers {diffusers.__version__}, peft {peft.__version__}, Python {platform.python_version()}")
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host " + text
    return text


def build_models(args, config, dtype):
    """Three models holding the same weights. Standard shares diffusers' tensors (frozen base weights are only
    read), merged gets its own concatenated q/k/v, so host memory stays near one copy."""
    # its advice to load with from_pretrained(torch_dtype=...) does not apply to random weights
    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        reference = diffusers.QwenImageTransformer2DModel(**config).eval()
    if dtype != torch.float32:
        reference.to(dtype)
    state = reference.state_dict()
    models = {}
    for name in args.variants:
        if name == "diffusers":
            models[name] = reference
            continue
        cls = QwenImageDiTMergedQKV if name == "merged" else QwenImageDiT
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict(merge_qkv_state_dict(state) if name == "merged" else state, strict=True, assign=True)
        models[name] = model.eval()
    for model in models.values():
        model.requires_grad_(False)
    return models


def call(name, model, batch):
    x, text, t, shapes = batch
    if name == "diffusers":
        # No text mask for any variant: with a mask diffusers always hands it to SDPA, which would be a
        # different (slower) computation; the fast no-padding path is what a batch-1 step runs.
        return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                     timestep=t, img_shapes=shapes, return_dict=False)[0]
    return model(x, text, None, t, shapes)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args, fns):
    """fns: name -> callable doing one iteration. Warm-up, then rounds with a rotating order (ABC, BCA, CAB...).
    Returns name -> {"times": [...], "peak_mb": extra CUDA memory over what was resident before the call}."""
    names = list(fns)
    print(f"[bench_dit] {args.warmup} warm-up + {args.iters} timed rounds of {', '.join(names)}",
          file=sys.stderr, flush=True)
    results = {n: {"times": [], "peak_mb": None} for n in names}
    for _ in range(args.warmup):
        for n in names:
            fns[n]()
    sync(args.device)
    for i in range(args.iters):
        for n in names[i % len(names):] + names[:i % len(names)]:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            sync(args.device)
            start = time.perf_counter()
            fns[n]()
            sync(args.device)
            results[n]["times"].append(time.perf_counter() - start)
            print(f"[bench_dit] round {i + 1} {n}: {results[n]['times'][-1]:.3f} s", file=sys.stderr, flush=True)
            if args.device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - resident) / 2**20
                results[n]["peak_mb"] = max(peak, results[n]["peak_mb"] or 0.0)
    return results


def run(args):
    args.load_start = os.getloadavg()[0]  # other jobs on the machine show up here and in the spread
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = dict(num_layers=args.num_layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                  in_channels=64, out_channels=16, joint_attention_dim=args.text_dim,
                  axes_dims_rope=rope_axes(args.head_dim))
    h, w = args.height // 16, args.width // 16  # packed tokens: VAE 8x, then 2x2 patches
    target_len = h * w
    shapes = [[(1, h, w), (1, h, w)]]  # the noisy target, then one edit image of the same size
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, 2 * target_len, 64, generator=g).to(args.device, dtype)
    text = torch.randn(1, args.text_len, args.text_dim, generator=g).to(args.device, dtype)
    t = torch.rand(1, generator=g).to(args.device)
    target = torch.randn(1, target_len, 16 * 4, generator=g).to(args.device, dtype)
    batch = (x, text, t, shapes)

    models = build_models(args, config, dtype)
    rows = {}

    if "forward" in args.modes:
        outputs = {}
        with torch.no_grad():
            for name, model in models.items():
                outputs[name] = call(name, model, batch).float()
        ref = outputs.get("diffusers", next(iter(outputs.values())))
        if not all(torch.isfinite(o).all() for o in outputs.values()):
            raise RuntimeError(f"non-finite DiT outputs in {args.dtype}: the random weights overflow at this size; "
                               "try --dtype fp32 or fewer --num_layers")
        agree = max(((o - ref).abs().max() / ref.abs().max()).item() for o in outputs.values())

        def forward(name, model):
            def fn():
                with torch.no_grad():
                    call(name, model, batch)
            return fn

        rows["forward"] = measure(args, {n: forward(n, m) for n, m in models.items()})
        rows["forward_agree"] = agree

    if "train" in args.modes:
        steps = {}
        for name, model in models.items():
            lora = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=QKV_TARGETS[name] + COMMON_TARGETS)
            inject_adapter_in_model(lora, model)
            model.train()
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def step(name=name, model=model, optimizer=optimizer):
                pred = call(name, model, batch)[:, :target_len]
                loss = F.mse_loss(pred.float(), target.float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps[name] = step
            rows.setdefault("lora_params", {})[name] = sum(p.numel() for p in params)
        rows["train"] = measure(args, steps)
    args.load_end = os.getloadavg()[0]
    return rows, target_len


def paired(results, name, other):
    """Per-round time ratios name/other: both ran in the same round, so slow drift of the machine cancels."""
    return [x / y for x, y in zip(results[name]["times"], results[other]["times"])]


def fmt_table(args, rows):
    cuda = args.device == "cuda"
    lines = ["| mode | variant | median s | min s | x standard | x diffusers |" + (" peak extra MiB |" if cuda else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for mode in ("forward", "train"):
        if mode not in rows:
            continue
        res = rows[mode]
        label = "forward (no grad)" if mode == "forward" else f"LoRA train step (r={args.rank})"
        for name, r in res.items():
            ratio = lambda other: (f"{statistics.median(paired(res, name, other)):.3f}"  # noqa: E731
                                   if other in res and other != name else "-")
            line = (f"| {label} | {name} | {statistics.median(r['times']):.3f} | {min(r['times']):.3f} | "
                    f"{ratio('standard')} | {ratio('diffusers')} |")
            if cuda:
                line += f" {r['peak_mb']:.0f} |"
            lines.append(line)
    return "\n".join(lines)


def verdict(rows):
    """One honest sentence per mode on merged/standard against the quickstart's '10-15% faster'."""
    out = []
    for mode, what in (("forward", "inference (forward)"), ("train", "the LoRA training step")):
        if mode not in rows or not {"merged", "standard"} <= set(rows[mode]):
            continue
        ratios = paired(rows[mode], "merged", "standard")
        ratio, low, high = statistics.median(ratios), min(ratios), max(ratios)
        # The middle half of the paired rounds decides: a few rounds disturbed by other jobs do not.
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio, ratio, ratio)
        if q3 <= 0.90:
            support = "this supports the quickstart's claim of 10-15% faster"
        elif q1 <= 0.90:
            support = ("the middle half of the rounds straddles the claimed 10% saving, so this run can neither "
                       "confirm nor refute the quickstart's claimed 10-15%")
        elif q3 < 0.97:
            support = "faster, but by less than the quickstart's claimed 10-15%"
        elif ratio <= 1.03:
            support = "no difference beyond noise: this does NOT support the quickstart's claimed 10-15%"
        else:
            support = "merged is slower here: this contradicts the quickstart's claimed 10-15% speed-up"
        out.append(f"For {what}, merged/standard = {ratio:.3f} (median of {len(ratios)} per-round ratios, middle "
                   f"half {q1:.3f}-{q3:.3f}, range {low:.3f}-{high:.3f}; {(1 - ratio) * 100:+.1f}% time saved): "
                   f"{support}.")
    return " ".join(out)


def spread_note(rows):
    # (max - min) / median over the timed iterations: a busy machine shows up here.
    return max((max(r["times"]) - min(r["times"])) / statistics.median(r["times"])
               for mode in ("forward", "train") if mode in rows for r in rows[mode].values())


def render(args, rows, target_len, argv):
    shown = [a for i, a in enumerate(argv)  # where the table was written is no part of what was measured
             if not a.startswith("--output") and not (i and argv[i - 1] == "--output")]
    cmd = " ".join(["python benchmarks/bench_dit.py"] + [shlex.quote(a) for a in shown])
    width = args.heads * args.head_dim
    spread = spread_note(rows)
    text = [
        START,
        "## DiT: standard vs merged-QKV vs diffusers (`benchmarks/bench_dit.py`)",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine(args.device)}; 1-minute load average {args.load_start:.1f} at start, "
        f"{args.load_end:.1f} at end.",
        f"- Model: {args.num_layers} block(s), {args.heads} heads x {args.head_dim} = width {width}, text width "
        f"{args.text_dim}, {args.dtype} on {args.device}; same random weights in all variants.",
        f"- Input: batch 1, {args.height}x{args.width} edit = {target_len} target + {target_len} edit-image tokens, "
        f"{args.text_len} text tokens, no text padding (no mask). {args.warmup} warm-up, {args.iters} timed "
        "iterations per variant, interleaved with a rotating order; the x columns are medians of per-round "
        "time ratios.",
    ]
    if "train" in rows:
        params = ", ".join(f"{n} {c / 1e6:.3f}M" for n, c in rows["lora_params"].items())
        text.append(f"- Train step: peft LoRA r={args.rank} (alpha {args.rank}) on q/k/v (or to_qkv/add_qkv_proj), "
                    f"to_out.0, to_add_out and the four MLP linears, LoRA weights and AdamW in {args.dtype}; forward + "
                    f"MSE on the target tokens + backward + AdamW step. Trainable LoRA parameters: {params} "
                    "(a merged to_qkv LoRA shares one A for q, k and v, "
                    "so it is smaller and does less LoRA work: part of any merged speed-up comes from that).")
    if "forward_agree" in rows:
        text.append(f"- Outputs of the variants agree to {rows['forward_agree']:.1e} (max abs diff / max abs).")
    text += ["", fmt_table(args, rows), "", verdict(rows)]
    busy = (f"Timing spread (max - min) / median reached {spread:.0%}: high variance, so read the min column as "
            "well as the median." if spread > 0.10 else
            f"Timing spread (max - min) / median stayed within {spread:.0%}.")
    text += ["", busy]
    if args.note:
        text += ["", args.note]
    text.append(END)
    return "\n".join(text) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rows, target_len = run(args)
    section = render(args, rows, target_len, argv)
    print(section)
    if args.output:
        write_section(args.output, "bench_dit", section)
        print(f"wrote the bench_dit section of {args.output}")


if __name__ == "__main__":
    main()
