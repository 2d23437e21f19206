"""DiT benchmark: our standard DiT vs our merged-QKV DiT vs diffusers' QwenImageTransformer2DModel, eager, compiled
(each block through torch.compile, as --compile does) and with fp8 weights (storage only, or fp8 matmuls).

Same weights in all variants; measures (a) a forward pass without grad and (b) one LoRA training step (LoRA on the
attention and MLP linears, forward + MSE + backward + AdamW; on a GPU as the trainer runs it: bf16 base, fp32 LoRA,
autocast). Within one flavour (eager, compiled, ...) the variants run interleaved, the order rotating each round, so
that machine drift hits all of them alike; the table gives median and min seconds, the paired ratios merged/standard
and ours/diffusers, each row's ratio to the eager row of its variant and, on CUDA, the peak memory. With
--full_layers N a second section times the merged DiT at N blocks with gradient checkpointing (the real model: 60),
LoRA step only, in the flavours of --full_flavors. Each section is rewritten in BENCHMARKS.md as soon as a flavour
is done, so a run cut short keeps what it measured; --budget_s / --full_budget_s skip the flavours that would
start after that many seconds (they are listed as skipped).

    python benchmarks/bench_dit.py                                   # CPU fp32, 1 block, 256x256 edit, eager
    python benchmarks/bench_dit.py --flavors eager,compiled,fp8 --iters 10
    bash benchmarks/run_gpu.sh                                       # the GPU suite: 8 blocks, then 60 blocks
"""
import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time

import peft
import torch
import torch.nn.functional as F

from diffsynth.lora import inject_lora
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV, merge_qkv_state_dict
from diffsynth.utils.benchmarking import (
    COMMON_TARGETS, QKV_TARGETS, VARIANTS, checkpointing_spec, comma_list, command_line, cpu_name, section_markers,
    write_section,
)
from diffsynth.utils.compile import compile_blocks, compiled_graphs
from diffsynth.utils.fp8 import enable_fp8_linear, fp8_compute_problem

try:
    import diffusers
except ImportError:  # the GPU machine has no diffusers unless run_gpu.sh installed its wheel
    diffusers = None

# flavour -> (compiled, fp8: None | "storage" | "compute")
FLAVORS = {"eager": (False, None), "compiled": (True, None), "fp8_storage": (False, "storage"),
           "fp8_storage_compiled": (True, "storage"), "fp8": (False, "compute"), "fp8_compiled": (True, "compute")}
FLAVOR_LABELS = {"eager": "eager", "compiled": "compiled", "fp8_storage": "fp8 storage",
                 "fp8_storage_compiled": "fp8 storage, compiled", "fp8": "fp8 compute",
                 "fp8_compiled": "fp8 compute, compiled"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flavor_parts(flavor):
    """'fp8_compiled:27+selective' -> ('fp8_compiled', 27, True): a flavour and, after a colon (--full_flavors
    only), how many of the last blocks are checkpointed (--blocks_to_checkpoint; None: every block) and/or
    "selective" (--selective_checkpointing), joined by +."""
    name, colon, spec = flavor.partition(":")
    return (name, *checkpointing_spec(spec)) if colon else (name, None, False)


def bad_checkpointing_spec(flavor, layers):
    """Why FLAVOR:SPEC is not a checkpointing spec for `layers` blocks, or None."""
    try:
        _, blocks, _ = flavor_parts(flavor)
        if blocks is None or 0 < blocks <= layers:
            return None
    except ValueError:
        pass
    return (f"after the colon, how many of the last blocks to checkpoint (1 to --full_layers, {layers}), "
            "selective, or both joined by +")


def flavor_mode(flavor):
    """-> (compiled, fp8: None | "storage" | "compute")"""
    return FLAVORS[flavor_parts(flavor)[0]]


def flavor_label(flavor):
    name, blocks, selective = flavor_parts(flavor)
    return (FLAVOR_LABELS[name] + (f", only the last {blocks} blocks checkpointed" if blocks else "")
            + (", selective (attention outputs kept)" if selective else ""))


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
    p.add_argument("--flavors", default="eager", help="comma list of " + ", ".join(FLAVORS))
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend of the compiled flavours (aot_eager: a quick check of the script)")
    p.add_argument("--budget_s", type=float, default=0, help="skip flavours that would start after this many "
                                                             "seconds (0: no limit)")
    p.add_argument("--full_layers", type=int, default=0,
                   help="also time the merged DiT at this many blocks with gradient checkpointing (LoRA step)")
    p.add_argument("--full_flavors", default="eager,compiled,fp8_storage,fp8,fp8_compiled,fp8_storage_compiled",
                   help="flavours of the --full_layers section, in this order; FLAVOR:N checkpoints only the last N "
                        "blocks (--blocks_to_checkpoint N), FLAVOR:selective keeps the attention outputs "
                        "(--selective_checkpointing), e.g. fp8_compiled:35, compiled:selective, compiled:39+selective")
    p.add_argument("--full_warmup", type=int, default=2)
    p.add_argument("--full_iters", type=int, default=3)
    p.add_argument("--full_budget_s", type=float, default=0, help="as --budget_s, for the --full_layers section")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--section", default="bench_dit",
                   help="name of the BENCHMARKS.md section (the full-size one is <section>_full)")
    p.add_argument("--output", default="BENCHMARKS.md",
                   help="markdown file whose sections are rewritten; '' writes none")
    p.add_argument("--profile", default="", help="a flavour of the first section: after its LoRA-step rounds, one "
                                                 "merged step runs under torch.profiler and the kernels that take "
                                                 "the most time go to the <section>_profile section")
    p.add_argument("--profile_top", type=int, default=25, help="rows of the profile table")
    p.add_argument("--note", default="", help="a sentence added under the tables (e.g. 'the machine was busy')")
    args = p.parse_args(argv)
    args.height = args.height or (1024 if args.device == "cuda" else 256)
    args.width = args.width or args.height
    if args.height % 16 or args.width % 16:
        p.error(f"--height/--width must be multiples of 16 (VAE 8x, then 2x2 packing), got {args.height}x{args.width}")
    args.modes = comma_list(p, args.modes, "mode", ("forward", "train"))
    args.variants = comma_list(p, args.variants, "variant", VARIANTS)
    args.flavors = comma_list(p, args.flavors, "flavor", FLAVORS)
    full = [f for f in args.full_flavors.split(",") if f]
    comma_list(p, ",".join(f.partition(":")[0] for f in full), "flavor", FLAVORS)
    for f in full:
        problem = bad_checkpointing_spec(f, args.full_layers)
        if problem:
            p.error(f"--full_flavors {f}: {problem}")
    args.full_flavors = full
    if args.profile and args.profile not in args.flavors:
        p.error(f"--profile {args.profile}: not one of --flavors ({', '.join(args.flavors)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    args.skipped_variants = []
    if diffusers is None and "diffusers" in args.variants:
        print("[bench_dit] diffusers is not installed: its rows are skipped (pip install diffusers, or run_gpu.sh "
              "with the wheels in .whl/)", file=sys.stderr)
        args.variants.remove("diffusers")
        args.skipped_variants.append("diffusers (not installed)")
    return args


def rope_axes(head_dim):
    # (16, 56, 56) for 128; any even split summing to head_dim is a valid RoPE layout for smaller toy heads.
    frames = 2 * max(1, head_dim // 16)
    height = 2 * ((head_dim - frames) // 4)
    return frames, height, head_dim - frames - height


def machine(device):
    text = (f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"diffusers {diffusers.__version__ if diffusers else 'absent'}, peft {peft.__version__}, "
            f"Python {platform.python_version()}")
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host " + text
    return text


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- models ---------------------------------------------------------------------------------------------------

def empty_model(cls, config, dtype, device):
    """An uninitialised model straight on `device` in `dtype` (built on the meta device: the 20B model never
    exists in fp32 or in host memory)."""
    with torch.device("meta"):
        model = cls(**config)
    return model.to(dtype).to_empty(device=device)


@torch.no_grad()
def init_weights(model, seed):
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0, 0.02)
        elif name.endswith("bias"):
            p.zero_()
        else:  # norm weights
            p.fill_(1.0)


def build_models(args, config, dtype, variants):
    """Models holding the same weights. With diffusers among them it is the reference and ours share its tensors
    (frozen base weights are only read); merged gets its own concatenated q/k/v. Otherwise our standard DiT is
    built uninitialised on the device and initialised there."""
    models = {}
    if "diffusers" in variants:
        diffusers.utils.logging.set_verbosity_error()  # its from_pretrained advice does not apply to random weights
        torch.manual_seed(args.seed)
        with torch.device(args.device):
            models["diffusers"] = diffusers.QwenImageTransformer2DModel(**config).to(dtype)
        state = models["diffusers"].state_dict()
    elif "standard" in variants or "merged" not in variants:
        models["standard"] = empty_model(QwenImageDiT, config, dtype, args.device)
        init_weights(models["standard"], args.seed)
        state = models["standard"].state_dict()
    else:  # merged alone (the full-size run): no second copy of anything
        models["merged"] = empty_model(QwenImageDiTMergedQKV, config, dtype, args.device)
        init_weights(models["merged"], args.seed)
        state = None
    for name in variants:
        if name not in models:
            cls = QwenImageDiTMergedQKV if name == "merged" else QwenImageDiT
            with torch.device("meta"):
                model = cls(**config)
            model.load_state_dict(merge_qkv_state_dict(state) if name == "merged" else state, strict=True, assign=True)
            models[name] = model
    for model in models.values():
        model.requires_grad_(False).eval()
    return {name: models[name] for name in variants}


def prepare(args, name, model, mode, flavor, checkpointing):
    """LoRA (train mode), fp8 and compile, in the trainer's order; -> the trainable parameters."""
    compiled, fp8 = flavor_mode(flavor)
    params = []
    if mode == "train":
        targets = QKV_TARGETS[name] + COMMON_TARGETS
        if name == "diffusers":  # as diffusers' own training scripts add it: plain peft
            peft.inject_adapter_in_model(peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets),
                                         model)
        else:  # as our trainer adds it (peft, with the fused LoRA forward)
            inject_lora(model, targets, args.rank)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.data = p.data.float()  # the trainer's fp32 LoRA weights; autocast does the mixing
                params.append(p)
        model.train()
        if checkpointing:
            _, blocks, selective = flavor_parts(flavor)
            model.enable_gradient_checkpointing(blocks=blocks, keep_attention=selective)
    if fp8:
        enable_fp8_linear(model, compute=fp8 == "compute")
    if compiled:
        compile_blocks(model, backend=args.compile_backend)
    return params


def call(name, model, batch):
    x, text, t, shapes = batch
    if name == "diffusers":
        # No text mask for any variant: with a mask diffusers always hands it to SDPA, which would be a
        # different (slower) computation; the fast no-padding path is what a batch-1 step runs.
        return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                     timestep=t, img_shapes=shapes, return_dict=False)[0]
    return model(x, text, None, t, shapes)


def measure(args, fns, warmup, iters):
    """fns: name -> callable doing one iteration. Warm-up, then rounds with a rotating order (ABC, BCA, CAB...).
    Returns name -> {"times": [...], "peak_mb": CUDA memory above what was resident before the call,
    "peak_gib": CUDA peak in all}."""
    names = list(fns)
    print(f"[bench_dit] {warmup} warm-up + {iters} timed rounds of {', '.join(names)}", file=sys.stderr, flush=True)
    results = {n: {"times": [], "peak_mb": None, "peak_gib": None, "warmup_s": 0.0} for n in names}
    for _ in range(warmup):
        for n in names:
            start = time.perf_counter()
            fns[n]()
            sync(args.device)
            results[n]["warmup_s"] += time.perf_counter() - start  # compilation shows here
    graphs = compiled_graphs()
    for i in range(iters):
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
                peak = torch.cuda.max_memory_allocated()
                results[n]["peak_mb"] = max((peak - resident) / 2**20, results[n]["peak_mb"] or 0.0)
                results[n]["peak_gib"] = max(peak / 2**30, results[n]["peak_gib"] or 0.0)
    if compiled_graphs() != graphs:  # a timed round compiled: its time is not the step's
        for n in names:
            results[n]["recompiled"] = True
    return results


def profile_step(args, fn):
    """One call of `fn` (warm: compiled already) under torch.profiler -> (rows, total us): per kernel (CUDA) or op
    (CPU) name, calls and self time, most time first. Self times add up to the step's device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(args.device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if cuda:  # kernels only: a CPU op's self device time is the kernels it launched, counted again
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        events = kernels or events
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [(e.key, e.count, getattr(e, attr)) for e in events], total


def fmt_profile(args, flavor, rows, total):
    lines = [f"One merged LoRA step ({flavor_label(flavor)}, {args.num_layers} block(s)) under torch.profiler: "
             f"{'GPU kernels' if args.device == 'cuda' else 'CPU ops'} by self time, {total / 1e3:.1f} ms in all "
             f"(the profiler's overhead included; the timed rounds above are the step's time).", "",
             "| kernel / op | calls | self ms | share |", "|---|---:|---:|---:|"]
    for name, calls, us in rows[:args.profile_top]:
        name = name.replace("|", "/")
        lines.append(f"| `{name[:110]}` | {calls} | {us / 1e3:.2f} | {us / total:.1%} |")
    rest = rows[args.profile_top:]
    if rest:
        lines.append(f"| ({len(rest)} others) | {sum(c for _, c, _ in rest)} | {sum(u for *_, u in rest) / 1e3:.2f} | "
                     f"{sum(u for *_, u in rest) / total:.1%} |")
    return "\n".join(lines)


def inputs(args, dtype):
    h, w = args.height // 16, args.width // 16  # packed tokens: VAE 8x, then 2x2 patches
    target_len = h * w
    shapes = [[(1, h, w), (1, h, w)]]  # the noisy target, then one edit image of the same size
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, 2 * target_len, 64, generator=g).to(args.device, dtype)
    text = torch.randn(1, args.text_len, args.text_dim, generator=g).to(args.device, dtype)
    t = torch.rand(1, generator=g).to(args.device)
    target = torch.randn(1, target_len, 16 * 4, generator=g).to(args.device, dtype)
    return (x, text, t, shapes), target, target_len


EAGER_OUTPUTS = {}  # blocks -> the merged DiT's eager forward output, which the fp8 flavours' outputs are held to


def group(args, config, dtype, variants, mode, flavor, warmup, iters, checkpointing=False):
    """Build, prepare and time one flavour of one mode for `variants`; -> (results, facts)."""
    batch, target, target_len = inputs(args, dtype)
    models = build_models(args, config, dtype, variants)
    facts = {}
    fns = {}
    autocast = dtype != torch.float32 and mode == "train"
    for name, model in models.items():
        params = prepare(args, name, model, mode, flavor, checkpointing)
        if mode == "forward":
            def fn(name=name, model=model):
                with torch.no_grad():
                    call(name, model, batch)
        else:
            facts.setdefault("lora_params", {})[name] = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def fn(name=name, model=model, optimizer=optimizer):
                with torch.autocast(args.device, dtype, enabled=autocast):
                    pred = call(name, model, batch)[:, :target_len]
                    loss = F.mse_loss(pred.float(), target.float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        fns[name] = fn
    if mode == "forward" and not flavor_mode(flavor)[0]:
        with torch.no_grad():
            outputs = {n: call(n, m, batch).float() for n, m in models.items()}
        ref = outputs.get("diffusers", next(iter(outputs.values())))
        facts["agree"] = max(((o - ref).abs().max() / ref.abs().max()).item() for o in outputs.values())
        facts["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
        if flavor == "eager" and "merged" in outputs:
            EAGER_OUTPUTS[config["num_layers"]] = outputs["merged"]
    results = measure(args, fns, warmup, iters)
    reference = EAGER_OUTPUTS.get(config["num_layers"])
    if mode == "forward" and flavor_mode(flavor)[1] and "merged" in models and reference is not None:
        # after the timed rounds, so that a compiled flavour's warm-up time still holds its compilation
        with torch.no_grad():
            out = call("merged", models["merged"], batch).float()
        facts[f"fp8_error:{flavor}"] = ((out - reference).norm() / reference.norm()).item()
    if args.profile == flavor and mode == "train" and not checkpointing and "merged" in fns:
        facts["profile"] = (flavor, profile_step(args, fns["merged"]))
    del models, fns
    free(args.device)
    return results, facts


def run_section(args, config, dtype, variants, modes, flavors, warmup, iters, budget, checkpointing, on_progress):
    """-> {"rows": {(mode, flavor): results}, "facts": {...}, "skipped": [(mode, flavor, why)]}"""
    start = time.monotonic()
    out = {"rows": {}, "facts": {}, "skipped": []}
    problem = fp8_compute_problem(args.device) if any(flavor_mode(f)[1] == "compute" for f in flavors) else None
    # Flavour by flavour, each in every mode: the cheap eager rows first, and a run cut by its budget loses the
    # last flavour in all modes rather than every flavour of the last mode.
    for flavor in flavors:
        for mode in modes:
            if flavor_mode(flavor)[1] == "compute" and problem:
                out["skipped"].append((mode, flavor, problem))
                continue
            elapsed = time.monotonic() - start
            if budget and elapsed > budget:
                out["skipped"].append((mode, flavor, f"time budget: {elapsed:.0f} s of {budget:.0f} s spent"))
                continue
            print(f"[bench_dit] {mode}, {flavor_label(flavor)}, {config['num_layers']} block(s)", file=sys.stderr,
                  flush=True)
            try:
                results, facts = group(args, config, dtype, variants, mode, flavor, warmup, iters, checkpointing)
            except Exception as e:  # one flavour failing (out of memory, a compile error) must not end the run
                print(f"[bench_dit] {mode}, {flavor_label(flavor)} failed: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                first_line = str(e).splitlines()[0][:200].rstrip(".") if str(e) else ""
                out["skipped"].append((mode, flavor, f"failed: {type(e).__name__}: {first_line}"))
                free(args.device)
                on_progress(out)
                continue
            out["rows"][(mode, flavor)] = results
            for key, value in facts.items():
                out["facts"].setdefault(key, value)
            on_progress(out)
    return out


# ---- report ---------------------------------------------------------------------------------------------------

def paired(results, name, other):
    """Per-round time ratios name/other: both ran in the same round, so slow drift of the machine cancels."""
    return [x / y for x, y in zip(results[name]["times"], results[other]["times"])]


def fmt_table(args, section, absolute_memory=False):
    cuda = args.device == "cuda"
    memory = " peak GiB |" if absolute_memory else " peak extra MiB |"
    lines = ["| mode | flavour | variant | median s | min s | x standard | x diffusers | x eager | warm-up s |"
             + (memory if cuda else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    rows = section["rows"]
    order = list(dict.fromkeys(mode for mode, _ in rows))  # the table mode by mode, in the order they ran
    for (mode, flavor), res in sorted(rows.items(), key=lambda kv: order.index(kv[0][0])):
        label = "forward (no grad)" if mode == "forward" else f"LoRA train step (r={args.rank})"
        eager = rows.get((mode, "eager"))
        for name, r in res.items():
            ratio = lambda other: (f"{statistics.median(paired(res, name, other)):.3f}"  # noqa: E731
                                   if other in res and other != name else "-")
            vs_eager = (f"{statistics.median(r['times']) / statistics.median(eager[name]['times']):.3f}"
                        if eager and flavor != "eager" and name in eager else "-")
            line = (f"| {label} | {flavor_label(flavor)} | {name} | {statistics.median(r['times']):.4f} | "
                    f"{min(r['times']):.4f} | {ratio('standard')} | {ratio('diffusers')} | {vs_eager} | "
                    f"{r['warmup_s']:.1f} |")
            if cuda:
                line += f" {r['peak_gib']:.1f} |" if absolute_memory else f" {r['peak_mb']:.0f} |"
            lines.append(line)
    return "\n".join(lines)


def verdict(section):
    """One sentence per (mode, flavour) on merged/standard, from the middle half of the paired rounds."""
    out = []
    for (mode, flavor), res in section["rows"].items():
        if not {"merged", "standard"} <= set(res):
            continue
        ratios = paired(res, "merged", "standard")
        ratio = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratio,) * 3
        if q3 < 1.0:
            word = "merged is faster"
        elif q1 > 1.0:
            word = "merged is SLOWER"
        else:
            word = "no difference beyond noise"
        what = "forward" if mode == "forward" else "LoRA step"
        out.append(f"{what}, {flavor_label(flavor)}: merged/standard = {ratio:.3f} (middle half of {len(ratios)} "
                   f"paired rounds {q1:.3f}-{q3:.3f}): {word}.")
    return " ".join(out)


GOALS = {  # the targets on one H100 80GB, bf16, 1024x1024 edit, r=32, batch 1 (8 blocks / 60 blocks)
    ("train", "compiled", 8): 0.100, ("train", "fp8_compiled", 8): 0.080, ("forward", "compiled", 8): 0.040,
    ("forward", "fp8_compiled", 8): 0.032, ("train", "compiled", 60): 1.05, ("train", "fp8_compiled", 60): 0.85,
}


def goal_lines(args, section, layers):
    if args.device != "cuda" or (args.height, args.width, args.text_len, args.rank) != (1024, 1024, 160, 32):
        return []
    lines = []
    for (mode, flavor, n), goal in GOALS.items():
        res = section["rows"].get((mode, flavor))
        if n == layers and res and "merged" in res:
            got = statistics.median(res["merged"]["times"])
            lines.append(f"merged {mode} {flavor_label(flavor)}: {got:.3f} s, goal <= {goal} s: "
                         f"{'met' if got <= goal else 'NOT met'}")
    return lines


def partial_lines(section):
    """A row checkpointing only some blocks, or selectively, against the same flavour checkpointing every block."""
    lines = []
    for (mode, flavor), res in section["rows"].items():
        base = section["rows"].get((mode, flavor_parts(flavor)[0]))
        if flavor == flavor_parts(flavor)[0] or not base:
            continue
        for name in res.keys() & base.keys():
            part, full = res[name], base[name]
            memory = (f"; peak {part['peak_gib']:.1f} vs {full['peak_gib']:.1f} GiB" if part.get("peak_gib") is not None
                      and full.get("peak_gib") is not None else "")
            lines.append(f"{name}, {flavor_label(flavor)}: "
                         f"{statistics.median(part['times']) / statistics.median(full['times']):.3f}x the time of "
                         f"every block checkpointed{memory}")
    return lines


def spread_note(section):
    spreads = [(max(r["times"]) - min(r["times"])) / statistics.median(r["times"])
               for res in section["rows"].values() for r in res.values()]
    if not spreads:
        return ""
    spread = max(spreads)
    return (f"Timing spread (max - min) / median reached {spread:.0%}: high variance, so read the min column as "
            "well as the median." if spread > 0.10 else
            f"Timing spread (max - min) / median stayed within {spread:.0%}.")


def render(args, section, argv, name, title, layers, checkpointing):
    start, end = section_markers(name)
    width = args.heads * args.head_dim
    h, w = args.height // 16, args.width // 16
    compiled = any(flavor_mode(f)[0] for _, f in section["rows"])
    text = [
        start,
        f"## {title} (`benchmarks/bench_dit.py`)",
        "",
        f"- Command: `{command_line('bench_dit.py', argv)}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine(args.device)}; 1-minute load average {section['load'][0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} now.",
        f"- Model: {layers} block(s), {args.heads} heads x {args.head_dim} = width {width}, text width "
        f"{args.text_dim}, {args.dtype} on {args.device}; same random weights in all variants"
        + (", gradient checkpointing" if checkpointing else "") + ".",
        f"- Input: batch 1, {args.height}x{args.width} edit = {h * w} target + {h * w} edit-image tokens, "
        f"{args.text_len} text tokens, no text padding (no mask). Per flavour, warm-up calls then timed iterations, "
        "the variants interleaved with a rotating order; `x standard` / `x diffusers` are medians of per-round time "
        "ratios, `x eager` the ratio of medians to the eager row of the same variant; `warm-up s` is the "
        "warm-up time, compilation included.",
        "- Flavours: compiled = each block's forward through torch.compile (`diffsynth/utils/compile.py`, as "
        f"`--compile`; backend {args.compile_backend}); fp8 storage = frozen linear weights in float8_e4m3fn, "
        "upcast per op (`--enable_fp8_training`); fp8 compute = the same weights, matmuls in fp8 with per-token "
        "activation scales (`--fp8_compute`).",
    ]
    if "lora_params" in section["facts"]:
        params = ", ".join(f"{n} {c / 1e6:.3f}M" for n, c in section["facts"]["lora_params"].items())
        mixed = args.dtype != "fp32"
        text.append(f"- Train step: LoRA r={args.rank} (alpha {args.rank}) on q/k/v (or to_qkv/add_qkv_proj), "
                    "to_out.0, to_add_out and the four MLP linears; ours through the trainer's `inject_lora` (peft "
                    "with the fused LoRA forward), diffusers through plain peft; LoRA weights and AdamW in fp32"
                    + (f", base weights {args.dtype} under autocast (as the trainer)" if mixed else "")
                    + f"; forward + MSE on the target tokens + backward + AdamW step. Trainable LoRA parameters: "
                    f"{params} (a merged to_qkv LoRA shares one A for q, k and v).")
    if "agree" in section["facts"]:
        text.append(f"- Outputs of the variants agree to {section['facts']['agree']:.1e} (max abs diff / max abs)"
                    + ("" if section["facts"]["finite"] else "; some outputs are not finite (random weights at this "
                       "depth overflow; the timings still hold)") + ".")
    for key, error in section["facts"].items():
        if key.startswith("fp8_error:"):
            text.append(f"- {flavor_label(key.partition(':')[2])}: the merged forward output is {error:.2%} from the "
                        f"eager {args.dtype} output of the same weights (relative L2 error).")
    if compiled and args.device == "cuda":
        text.append("- Compiled rows: the token dims are dynamic in our blocks (as the trainer compiles them), "
                    "static in diffusers' (torch's default).")
    text += ["", fmt_table(args, section, absolute_memory=checkpointing), ""]
    said = verdict(section)
    if said:
        text += [said, ""]
    for line in goal_lines(args, section, layers) + partial_lines(section):
        text.append(f"- {line}")
    for (mode, flavor), res in section["rows"].items():
        if any(r.get("recompiled") for r in res.values()):
            text.append(f"- Warning: {mode}, {flavor_label(flavor)}: something compiled during the timed rounds; "
                        "those rows include compilation time.")
    for mode, flavor, why in section["skipped"]:
        text.append(f"- Skipped: {mode}, {flavor_label(flavor)}: {why}.")
    for variant in args.skipped_variants:
        text.append(f"- Skipped variant: {variant}.")
    text += ["", spread_note(section)]
    if args.note:
        text += ["", args.note]
    text.append(end)
    return "\n".join(text) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = dict(num_layers=args.num_layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                  in_channels=64, out_channels=16, joint_attention_dim=args.text_dim,
                  axes_dims_rope=rope_axes(args.head_dim))

    def writer(name, title, layers, checkpointing):
        load = os.getloadavg()

        def write(section):
            section["load"] = load
            text = render(args, section, argv, name, title, layers, checkpointing)
            if args.output:
                write_section(args.output, name, text)
            return text
        return write

    write_main = writer(args.section, "DiT: standard vs merged-QKV vs diffusers", args.num_layers, False)
    profiled = []

    def write(section):  # the profile's section as soon as it exists: a run cut short keeps it
        if "profile" in section["facts"] and not profiled:
            flavor, (rows, total) = section["facts"]["profile"]
            start, end = section_markers(f"{args.section}_profile")
            profiled.append("\n".join([
                start, f"## Where a LoRA step's time goes (`benchmarks/bench_dit.py --profile {flavor}`)", "",
                f"- Command: `{command_line('bench_dit.py', argv)}`", f"- Machine: {machine(args.device)}.", "",
                fmt_profile(args, flavor, rows, total), end]) + "\n")
            if args.output:
                write_section(args.output, f"{args.section}_profile", profiled[0])
        return write_main(section)

    section = run_section(args, config, dtype, args.variants, args.modes, args.flavors, args.warmup, args.iters,
                          args.budget_s, False, write)
    print(write(section))
    if profiled:
        print(profiled[0])
    if args.full_layers:
        full = dict(config, num_layers=args.full_layers)
        write = writer(f"{args.section}_full", f"Merged DiT, {args.full_layers} blocks, gradient checkpointing, "
                       "LoRA step", args.full_layers, True)
        section = run_section(args, full, dtype, ["merged"], ["train"], args.full_flavors, args.full_warmup,
                              args.full_iters, args.full_budget_s, True, write)
        print(write(section))
    if args.output:
        print(f"wrote the {args.section} section(s) of {args.output}")


if __name__ == "__main__":
    main()
