"""VRAM planner: the predicted peak GPU memory of a LoRA training step (or an inference step) for given flags,
and the cheapest flags that fit a budget. Arithmetic only: the model's shapes come from a meta-device DiT (no
weights are read), nothing is loaded or allocated.

What is counted (bytes on the GPU, per process):
- weights: the resident DiT blocks and the layers outside the blocks, in the run's dtype (bf16 on a GPU) or, with
  fp8 storage, 1 byte per linear weight + one fp32 scale per output row (biases and norms stay bf16); with
  block swap, the swapped blocks are replaced by the (prefetch + 1) block copies in flight;
- the LoRA: fp32 weights, fp32 gradients (all of them at the optimizer step), the optimizer's state (AdamW: two
  fp32 moments, 8 bytes per parameter; see OPTIMIZER_STATE_BYTES; from the second step on: "steady state", the
  first step's peak has none yet) and, with --ema_decay, an fp32 EMA copy;
- activations, in units of one hidden state of the whole sequence, U = batch x tokens x 3072 x 2 bytes (bf16):
  with gradient checkpointing every block keeps its input (1 U per block; with the offload they wait in host
  memory instead) and one block at a time holds its recomputed activations during its backward pass;
  without checkpointing every block keeps its activations until the backward pass; with --blocks_to_checkpoint N
  the last N blocks are checkpointed and the others keep their activations; with --selective_checkpointing each
  checkpointed block also keeps its attention output (1 U, and a log-sum-exp of 1/64 U, on the GPU even with the
  offload);
- with fp8 storage, the transient full-precision copy of the largest weight that the backward pass upcasts;
- the text encoder and the VAE when they stay on the GPU (training without a complete conditioning cache).

Per-token activation counts (U per block), from the block's code under bf16 autocast with LoRA on the default
targets as it was when the H100 figures below were measured (commit a521db1): 32 U saved for the backward pass
(modulated inputs 2, q/k RMSNorm in fp32 6, SDPA q/k/v/out 4, to_out input 1, gated outputs 2, MLP input 2, GELU
input and output 8, bf16 copies of the inputs of the LoRA-adapted linears, which peft casts, 7) plus about 9 U of
gradients alive at the peak of the block's backward (the MLP's): 41 U, which is also what the measured peaks
imply (CALIBRATION). Without checkpointing (or with --blocks_to_checkpoint, for the blocks left out) a block
keeps what it saves for its backward pass, its input included: 33 U in the code of a521db1, less in this one (the
eager RoPE as one complex multiply, the merged prologue's views, LayerNorms that keep bf16 under autocast): 23-24 U
counted on the CPU (tests/test_vram_planner.py), and on an H100 an eager 8-block LoRA step without checkpointing
peaked 9845 MiB above the weights at 8352 tokens (BENCHMARKS.md, code of 2026-11-27 before those changes): 201 U,
24 U a block besides 9 U of gradients. 26 U is used. An inference forward holds
about 10 U at its peak by the block's code (the MLP's input, hidden and GELU); the peaks measured on an H100
(bench_memory, 1024x1024, 160 text tokens, two DiT passes with 41 and with 45 blocks swapped: 14.37 and 11.84 GiB)
were 11 U above that in both (not broken down further), so 21 U is used. tests/test_vram_planner.py measures what
the current block saves (CPU, bf16 autocast) and fails if it outgrows these figures.

Not modelled: the CUDA context and allocator fragmentation (keep HEADROOM_GIB free), cuDNN/cuBLAS workspaces,
the VAE's decode activations (an uncalibrated estimate), data loader memory.
"""
import math
import re
from dataclasses import dataclass, field, replace

GIB = 2**30
HIDDEN_UNITS_CKPT = 41  # U per block: recompute + backward of one block (see above)
HIDDEN_UNITS_SAVED = 26  # U per block kept without checkpointing, its input included (measured 24, see above)
GRADIENT_UNITS = 9  # U of gradients alive at the peak of a block's backward pass (in HIDDEN_UNITS_CKPT too)
ATTENTION_KEPT_UNITS = 1 + 1 / 64  # --selective_checkpointing: SDPA's output and its fp32 log-sum-exp per block
HIDDEN_UNITS_INFERENCE = 21  # U at the peak of a forward pass without gradients (measured; see above)
HEADROOM_GIB = 2.0  # what a budget keeps free: CUDA context (~0.5 GiB), fragmentation, the planner's error
PCIE_GBPS = 24.0  # host-to-device bandwidth assumed by the cost estimate (PCIe 4.0 x16 in practice)

# The real model: Qwen-Image(-Edit)'s DiT config, and the other components' parameter counts (computed from their
# official configs on the meta device; tests/test_vram_planner.py recomputes them).
QWEN_IMAGE_DIT = dict(num_layers=60, num_attention_heads=24, attention_head_dim=128, in_channels=64, out_channels=16,
                      joint_attention_dim=3584, axes_dims_rope=(16, 56, 56), patch_size=2)
TEXT_ENCODER_PARAMS = 8_292_166_656  # Qwen2.5-VL-7B (Qwen2_5_VLForConditionalGeneration, lm_head included)
VAE_PARAMS = 126_892_531  # AutoencoderKLQwenImage
VAE_DECODE_UNITS = 8  # full-resolution 96-channel feature maps alive at the VAE decoder's peak (estimate)

# Measured on one H100 80GB (torch 2.11, bf16, batch 1, 1024x1024 edit = 4096 + 4096 image tokens + 160 text
# tokens, LoRA r=32 on the merged DiT's default targets, gradient checkpointing; issue 9/11 text).
CALIBRATION = [
    dict(label="bf16, gradient checkpointing", fp8=False, measured_gib=43.6, measured_resident_gib=38.9),
    dict(label="fp8 storage, gradient checkpointing", fp8=True, measured_gib=24.6, measured_resident_gib=19.8),
]
CALIBRATION_INPUT = dict(batch=1, target_tokens=4096, edit_tokens=4096, text_tokens=160, rank=32)

# Step times, for ranking flags only. One H100 80GB run of this code (BENCHMARKS.md, 2026-11-27; merged DiT, LoRA
# r=32 in fp32 under autocast as the trainer runs it, 1024x1024 edit, 160 text tokens), keyed by (--compile,
# weights): the 60-block step with gradient checkpointing, s; a block's forward as a share of a checkpointed
# block's step (8 blocks' forward / 8 vs the 60-block step / 60); a block's step without checkpointing as a share
# of a checkpointed one (8 blocks without it / 8 vs 60 with it / 60). fp8 storage with --compile was not measured:
# it is assumed to cost what it costs eager, relative to bf16 (STEP_SECONDS falls back to that ratio).
STEP_SECONDS = {(False, "bf16"): 1.822, (False, "fp8"): 2.181, (False, "fp8_compute"): 2.319,
                (True, "bf16"): 1.238, (True, "fp8_compute"): 1.164}
FORWARD_SHARE = {False: (0.0599 / 8) / (1.822 / 60), True: (0.0413 / 8) / (1.238 / 60)}
NO_CHECKPOINTING_FACTOR = {False: (0.1745 / 8) / (1.822 / 60), True: (0.1171 / 8) / (1.238 / 60)}
# Attention's forward in one block at the calibration input, s: what --selective_checkpointing takes out of each
# checkpointed block's recompute. Derived, not timed on its own: the H100 profile of an eager 8-block step
# (0.150 s) gave attention forward + backward 27% of GPU time, and flash attention's backward does 2.5 times its
# forward's matmul work: 0.27 x 0.150 / 8 / 3.5 = 1.45 ms (857 GFLOP at 590 TFLOP/s). The same kernel eager and
# compiled; it grows with the square of the tokens, which the planner's fixed step times do not follow.
ATTENTION_FORWARD_SECONDS = 0.27 * 0.150 / 8 / 3.5


# Optimizer state per trainable parameter, bytes (fp32 states; 8-bit AdamW: two 1-byte states; Adafactor: factored
# second moments, a row and a column per matrix, no first moment by default; Prodigy: exp_avg, exp_avg_sq, s, p0).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0, "prodigy": 16, "lion": 4,
                         "adamw_schedulefree": 8}


@dataclass(frozen=True)
class DiTCounts:
    """Parameter counts of a DiT by role, exact from its shapes."""
    num_layers: int
    dim: int
    block_linear: int  # elements of the nn.Linear weights of one block
    block_rows: int  # their output rows (one fp8 scale each)
    block_other: int  # biases and norm weights of one block
    largest_linear: int  # the largest single weight (fp8's transient upcast)
    outer_linear: int
    outer_rows: int
    outer_other: int
    lora: int = 0  # LoRA parameters (all blocks)
    lora_targets: tuple = ()

    @property
    def total(self):
        return (self.num_layers * (self.block_linear + self.block_other) + self.outer_linear + self.outer_other)


def dit_counts(config=None, merged_qkv=True, lora_targets=None, rank=32) -> DiTCounts:
    """Count the DiT's parameters on the meta device (no memory, no weights) and the LoRA that `lora_targets`
    (a comma list, matched as peft matches names) of rank `rank` adds."""
    import torch
    import torch.nn as nn

    from ..lora.inject import matches_target, parse_target_modules
    from ..models import QwenImageDiT, QwenImageDiTMergedQKV

    config = dict(QWEN_IMAGE_DIT if config is None else config)
    with torch.device("meta"):
        model = (QwenImageDiTMergedQKV if merged_qkv else QwenImageDiT)(**config)
    block = model.transformer_blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    block_linear = sum(m.weight.numel() for m in linears)
    outer = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith("transformer_")]
    outer_linear = sum(m.weight.numel() for m in outer)
    outer_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("transformer_"))
    lora, targets = 0, ()
    if lora_targets:
        targets = tuple(parse_target_modules(lora_targets))
        lora = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(matches_target(name, t) for t in targets))
    return DiTCounts(
        num_layers=len(model.transformer_blocks), dim=config["num_attention_heads"] * config["attention_head_dim"],
        block_linear=block_linear, block_rows=sum(m.out_features for m in linears),
        block_other=sum(p.numel() for p in block.parameters()) - block_linear,
        largest_linear=max(m.weight.numel() for m in linears + outer),
        outer_linear=outer_linear, outer_rows=sum(m.out_features for m in outer),
        outer_other=outer_params - outer_linear, lora=lora, lora_targets=targets)


@dataclass(frozen=True)
class Setup:
    """What decides the memory of a step. Tokens are per sample; dtype_bytes 2 for bf16/fp16, 4 for fp32."""
    batch: int = 1
    target_tokens: int = 4096
    edit_tokens: int = 4096
    text_tokens: int = 1433
    dtype_bytes: int = 2
    fp8: bool = False
    checkpointing: bool = True
    checkpointing_offload: bool = False
    checkpointed_blocks: int = None  # with checkpointing: the last this many blocks (None: all)
    compiled: bool = False  # --compile: changes the step time, not the memory the planner counts
    fp8_compute: bool = False  # with fp8: --fp8_compute (the same storage, fp8 matmuls) instead of fp8 storage
    keep_attention: bool = False  # with checkpointing: --selective_checkpointing
    blocks_to_swap: int = 0
    prefetch: int = 1
    encoders_on_gpu: bool = False  # training without a complete conditioning cache keeps them there
    optimizer_state_bytes: int = 8  # per LoRA parameter (OPTIMIZER_STATE_BYTES)
    ema: bool = False
    processes: int = 1  # FSDP shards the weights, the LoRA and its optimizer state over this many processes
    fsdp: bool = False

    def flags(self):
        out = []
        if self.checkpointing:
            out.append("--use_gradient_checkpointing")
        if self.checkpointing and self.checkpointed_blocks is not None:
            out += ["--blocks_to_checkpoint", str(self.checkpointed_blocks)]
        if self.checkpointing and self.keep_attention:
            out.append("--selective_checkpointing")
        if self.checkpointing_offload:
            out.append("--use_gradient_checkpointing_offload")
        if self.fp8:
            out.append("--fp8_compute" if self.fp8_compute else "--enable_fp8_training")
        if self.blocks_to_swap:
            out += ["--blocks_to_swap", str(self.blocks_to_swap)]
        if not self.encoders_on_gpu:
            out.append("--cache_conditioning")
        return out


@dataclass
class Breakdown:
    parts: dict = field(default_factory=dict)  # name -> bytes at the peak
    first_step: float = 0.0  # bytes: the first step's peak (no optimizer state yet)

    @property
    def peak(self):
        return sum(self.parts.values())

    def gib(self, name=None):
        return (self.peak if name is None else self.parts[name]) / GIB


def block_bytes(counts: DiTCounts, s: Setup) -> int:
    if s.fp8:
        return counts.block_linear + 4 * counts.block_rows + s.dtype_bytes * counts.block_other
    return s.dtype_bytes * (counts.block_linear + counts.block_other)


def weight_bytes(counts: DiTCounts, s: Setup) -> int:
    """DiT weights on the GPU: resident blocks, the layers outside them, the swapped blocks' copies in flight."""
    if s.fp8:
        outer = counts.outer_linear + 4 * counts.outer_rows + s.dtype_bytes * counts.outer_other
    else:
        outer = s.dtype_bytes * (counts.outer_linear + counts.outer_other)
    swapped = min(s.blocks_to_swap, counts.num_layers)
    in_flight = min(s.prefetch + 1, swapped) if swapped else 0
    total = (counts.num_layers - swapped + in_flight) * block_bytes(counts, s) + outer
    if s.fsdp and s.processes > 1:  # each process holds its shard, plus the unsharded blocks at work (about 2)
        total = total / s.processes + 2 * block_bytes(counts, s)
    return int(total)


def checkpointed(counts: DiTCounts, s: Setup) -> int:
    """How many blocks are checkpointed."""
    if not s.checkpointing:
        return 0
    return counts.num_layers if s.checkpointed_blocks is None else min(s.checkpointed_blocks, counts.num_layers)


def hidden_unit(counts: DiTCounts, s: Setup) -> int:
    """U: one hidden state of the whole sequence (image and text tokens) in the compute dtype."""
    return s.batch * (s.target_tokens + s.edit_tokens + s.text_tokens) * counts.dim * s.dtype_bytes


def encoder_bytes(s: Setup) -> int:
    return s.dtype_bytes * (TEXT_ENCODER_PARAMS + VAE_PARAMS)


def training_peak(counts: DiTCounts, s: Setup) -> Breakdown:
    """Peak GPU memory of a LoRA training step in the steady state, by part (the larger of the backward pass and
    the optimizer step); `.first_step`: the same before the optimizer has allocated its state."""
    unit = hidden_unit(counts, s)
    lora = counts.lora / (s.processes if s.fsdp else 1)
    common = {"DiT weights": weight_bytes(counts, s)}
    if s.encoders_on_gpu:
        common["text encoder and VAE"] = encoder_bytes(s)
    backward = {**common, "LoRA weights (fp32)": 4 * lora}
    if s.ema:
        common["EMA of the LoRA (fp32)"] = backward["EMA of the LoRA (fp32)"] = 4 * lora
    if s.checkpointing:
        kept = checkpointed(counts, s)
        backward["block inputs kept for the backward"] = 0 if s.checkpointing_offload else kept * unit
        if s.keep_attention:
            backward["attention outputs kept (selective checkpointing)"] = kept * ATTENTION_KEPT_UNITS * unit
        if kept < counts.num_layers:
            backward["activations of the blocks not checkpointed"] = \
                (counts.num_layers - kept) * HIDDEN_UNITS_SAVED * unit
        # the backward pass starts with the last block, a checkpointed one: the largest transient of all
        backward["one block's recompute and backward"] = HIDDEN_UNITS_CKPT * unit
    else:
        backward["activations of every block"] = counts.num_layers * HIDDEN_UNITS_SAVED * unit
        backward["gradients alive in the backward"] = GRADIENT_UNITS * unit
    if s.fp8:
        backward["fp8 weight upcast (transient)"] = 2 * counts.largest_linear * s.dtype_bytes
    first = sum(backward.values())
    backward["optimizer state (from step 2)"] = s.optimizer_state_bytes * lora
    # At the optimizer step the activations are gone and every LoRA gradient exists; a foreach optimizer adds
    # about one gradient-sized temporary.
    step = {**common, "LoRA weights, gradients, optimizer state, temporary": (12 + s.optimizer_state_bytes) * lora}
    phase = max(backward, step, key=lambda d: sum(d.values()))
    return Breakdown({k: int(v) for k, v in phase.items()}, first_step=int(max(first, sum(step.values()))))


def denoising_bytes(counts: DiTCounts, s: Setup) -> int:
    """A DiT forward pass without gradients: its weights on the GPU (resident + swap copies) and the activations."""
    return weight_bytes(counts, s) + HIDDEN_UNITS_INFERENCE * hidden_unit(counts, s)


def inference_peak(counts: DiTCounts, s: Setup, offload=None, height=1024, width=1024) -> Breakdown:
    """Peak GPU memory of an edit: the largest of the text-encoding, denoising and decoding phases.
    `offload`: None (everything stays on the GPU), "model" or "sequential" (the pipeline's modes)."""
    dit = denoising_bytes(counts, s)
    text = s.dtype_bytes * TEXT_ENCODER_PARAMS
    if offload == "sequential":  # one module at a time: the largest is the token embedding (152064 x 3584)
        text = s.dtype_bytes * 152064 * 3584
    vae = s.dtype_bytes * (VAE_PARAMS + VAE_DECODE_UNITS * height * width * 96)
    if offload:
        phases = {"denoising (DiT)": dit, "text encoder": text, "VAE decode (estimate)": vae}
    else:
        resident = dit + text + s.dtype_bytes * VAE_PARAMS
        phases = {"denoising (DiT + resident encoders)": resident,
                  "VAE decode (estimate)": resident - HIDDEN_UNITS_INFERENCE * hidden_unit(counts, s) + vae}
    name = max(phases, key=phases.get)
    return Breakdown({name: int(phases[name])}, first_step=int(phases[name]))


def inference_fit(counts: DiTCounts, s: Setup, budget_bytes: int):
    """The fewest swapped blocks (each costs a copy per DiT pass, 60 passes in a 30-step edit with CFG) and then the
    least offloading (none, the pipeline's "model", "sequential": a copy per edit) that fit an edit into
    `budget_bytes` minus the headroom. -> (offload, blocks_to_swap, Breakdown) or None."""
    usable = budget_bytes - HEADROOM_GIB * GIB
    for swap in range(counts.num_layers + 1):
        for offload in (None, "model", "sequential"):
            peak = inference_peak(counts, replace(s, blocks_to_swap=swap), offload=offload)
            if peak.peak <= usable:
                return offload, swap, peak
    return None


def weights_kind(s: Setup) -> str:
    return "fp8_compute" if s.fp8 and s.fp8_compute else ("fp8" if s.fp8 else "bf16")


def checkpointed_step_seconds(s: Setup) -> float:
    """The measured (or, for fp8 storage compiled, derived) 60-block step with every block checkpointed."""
    key = (s.compiled, weights_kind(s))
    if key in STEP_SECONDS:
        return STEP_SECONDS[key]
    eager = STEP_SECONDS[(False, key[1])] / STEP_SECONDS[(False, "bf16")]
    return STEP_SECONDS[(s.compiled, "bf16")] * eager


def step_cost(counts: DiTCounts, s: Setup) -> float:
    """Estimated step time relative to the all-resident bf16 step with every block checkpointed, compiled or not as
    `s` is (H100-based; PCIe bandwidth PCIE_GBPS): for ranking flags, not a measurement."""
    n = counts.num_layers
    block = checkpointed_step_seconds(s) / n  # a checkpointed block's forward, recompute and backward
    forward = FORWARD_SHARE[s.compiled] * block
    kept = checkpointed(counts, s)
    saved = ATTENTION_FORWARD_SECONDS if s.checkpointing and s.keep_attention else 0.0  # per checkpointed block
    step = (block - saved) * kept + block * (n - kept) * NO_CHECKPOINTING_FACTOR[s.compiled]
    copy = block_bytes(counts, s) / (PCIE_GBPS * 1e9)
    swapped = min(s.blocks_to_swap, n)
    # Each swapped (so checkpointed) block is copied for the forward and again for the recompute; a copy hides
    # behind the compute of the block before it: its forward, then its recompute and backward.
    exposed = swapped * (max(0.0, copy - forward) + max(0.0, copy - (block - saved - forward)))
    if s.checkpointing_offload:
        exposed += 2 * kept * hidden_unit(counts, s) / (PCIE_GBPS * 1e9)
    return (step + exposed) / STEP_SECONDS[(s.compiled, "bf16")]


def fewest_checkpointed(counts: DiTCounts, s: Setup, budget_bytes: int):
    """`s` with gradient checkpointing on the fewest blocks (at least the swapped ones; checkpointed_blocks None:
    every block) whose predicted peak fits `budget_bytes` minus the headroom -> (Setup, Breakdown), or None when
    even every block checkpointed does not fit."""
    usable = budget_bytes - HEADROOM_GIB * GIB
    n = counts.num_layers
    for kept in range(max(s.blocks_to_swap, 1), n + 1):
        cand = replace(s, checkpointing=True, checkpointed_blocks=None if kept == n else kept)
        peak = training_peak(counts, cand)
        if peak.peak <= usable:
            return cand, peak
    return None


def cheapest_fit(counts: DiTCounts, s: Setup, budget_bytes: int):
    """The flags with the lowest estimated step time whose predicted peak fits `budget_bytes` minus the
    headroom; -> (Setup, Breakdown, cost) or None. Batch, sizes, rank, precision, --compile and
    --fp8_compute (which fp8 a candidate with fp8 weights uses) are kept as given."""
    best = None
    # (checkpointing, its offload, --selective_checkpointing)
    options = [(False, False, False)] + [(True, offload, keep) for offload in (False, True) for keep in (False, True)]
    for checkpointing, offload, keep in options:
        for fp8 in (False, True):
            for swap in range(0, counts.num_layers + 1) if checkpointing else (0,):
                base = replace(s, checkpointing=checkpointing, checkpointing_offload=offload, fp8=fp8,
                               blocks_to_swap=swap, encoders_on_gpu=False, checkpointed_blocks=None,
                               keep_attention=keep)
                if checkpointing:
                    fit = fewest_checkpointed(counts, base, budget_bytes)
                else:
                    peak = training_peak(counts, base)
                    fit = (base, peak) if peak.peak <= budget_bytes - HEADROOM_GIB * GIB else None
                if fit is None:
                    continue
                cand, peak = fit
                cost = step_cost(counts, cand)
                if best is None or (cost, peak.peak) < (best[2], best[1].peak):
                    best = (cand, peak, cost)
                if checkpointed(counts, cand) == max(swap, 1):
                    break  # nothing left to trade: more swapping only costs more
    return best


def auto_checkpointed_blocks(args, budget_bytes, config=None, processes=1, fsdp=False):
    """--blocks_to_checkpoint auto for the trainer's flags and the DiT of `config` (default: the real one): the
    fewest checkpointed blocks that fit `budget_bytes` -> (blocks, or None for every block; the sentence that says
    so: how many, or that nothing fits and every block is checkpointed)."""
    counts = dit_counts(config, merged_qkv=args.merged_qkv, lora_targets=args.lora_target_modules, rank=args.lora_rank)
    s = setup_from_args(args, counts, processes, fsdp)
    fit = fewest_checkpointed(counts, s, budget_bytes)
    n = counts.num_layers
    if fit is None:
        everything = training_peak(counts, replace(s, checkpointing=True, checkpointed_blocks=None)).peak
        return None, (f"{n} of {n} blocks checkpointed: even so the VRAM planner predicts {everything / GIB:.1f} "
                         f"GiB, more than fits ({HEADROOM_GIB:.0f} GiB kept free); lower --batch_size or --max_pixels, "
                         "or add --blocks_to_swap / --enable_fp8_training (--dry_run --vram_budget lists what fits)")
    kept = fit[0].checkpointed_blocks
    return kept, (f"{kept or n} of {n} blocks checkpointed, the fewest with which the VRAM planner fits this run "
                     f"({HEADROOM_GIB:.0f} GiB kept free)")


def parse_vram(text) -> int:
    """'24GB', '24GiB', '24G', '24' or '16384MB' -> bytes. GB means GiB here: GPU memory is sold in binary units
    (a "24 GB" card has 24 GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(G|GB|GIB|M|MB|MIB)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--vram_budget {text!r}: write the GPU's memory, e.g. 24GB, 16GB or 80GB")
    return int(float(m.group(1)) * (2**20 if (m.group(2) or "G").startswith("M") else GIB))


def vision_tokens(area, merge=28):
    """Tokens the Qwen2.5-VL encoder makes of an image of `area` pixels (14-pixel patches, merged 2x2)."""
    return round(math.sqrt(area) / merge) ** 2


def setup_from_args(args, counts: DiTCounts = None, processes=1, fsdp=False) -> Setup:
    """The trainer's flags -> Setup, for the largest image the flags allow (targets of --max_pixels area, the
    largest of several, or --height x --width, one edit image of --edit_image_area); text tokens estimated from the
    prompt template."""
    if args.height and args.width:
        target = (args.height // 16) * (args.width // 16)
    else:
        from .image import pixel_areas

        target = max(pixel_areas(args.max_pixels)) // 256
    edit = args.edit_image_area // 256
    # the VL model sees the edit image at 1024x1024 (Edit) or 384x384 (Edit-Plus); ~64 tokens of prompt and template
    text = vision_tokens(384 * 384 if args.edit_plus else 1024 * 1024) + 64
    mixed = args.mixed_precision if args.mixed_precision != "auto" else "bf16"
    return Setup(batch=args.batch_size, target_tokens=target, edit_tokens=edit, text_tokens=text,
                 dtype_bytes=4 if mixed == "no" else 2,
                 fp8=bool(args.enable_fp8_training or getattr(args, "fp8_compute", False)),  # the same storage
                 fp8_compute=bool(getattr(args, "fp8_compute", False)), compiled=bool(getattr(args, "compile", False)),
                 checkpointing=args.use_gradient_checkpointing,
                 checkpointing_offload=args.use_gradient_checkpointing_offload,
                 keep_attention=bool(getattr(args, "selective_checkpointing", False)),
                 checkpointed_blocks=None if getattr(args, "blocks_to_checkpoint", None) == "auto" else
                 getattr(args, "blocks_to_checkpoint", None),  # auto: until resolved, every block
                 blocks_to_swap=args.blocks_to_swap, encoders_on_gpu=args.cache_conditioning is None,
                 processes=processes, fsdp=fsdp, ema=bool(getattr(args, "ema_decay", None)),
                 optimizer_state_bytes=OPTIMIZER_STATE_BYTES.get(getattr(args, "optimizer", "adamw"), 8))


def calibration_errors(counts: DiTCounts = None):
    """-> [(label, predicted first-step GiB, measured GiB, relative error)] on the measured H100 figures."""
    counts = counts or dit_counts(lora_targets=DEFAULT_MERGED_TARGETS, rank=CALIBRATION_INPUT["rank"])
    rows = []
    for point in CALIBRATION:
        s = Setup(batch=1, target_tokens=4096, edit_tokens=4096, text_tokens=160, fp8=point["fp8"])
        predicted = training_peak(counts, s).first_step / GIB
        rows.append((point["label"], predicted, point["measured_gib"], predicted / point["measured_gib"] - 1))
    return rows


DEFAULT_MERGED_TARGETS = ("to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,"
                          "txt_mlp.net.0.proj,txt_mlp.net.2")


def describe(counts: DiTCounts, s: Setup, peak: Breakdown, title="predicted peak GPU memory") -> list[str]:
    lines = [f"{title}: {peak.gib():.1f} GiB"]
    for name, value in peak.parts.items():
        lines.append(f"  {name:<48} {value / GIB:6.2f} GiB")
    return lines


def plan_report(args, processes=1, fsdp=False) -> str:
    """What `--dry_run` prints: the predicted peak for the flags and, with --vram_budget, the cheapest fit."""
    counts = dit_counts(merged_qkv=args.merged_qkv, lora_targets=args.lora_target_modules, rank=args.lora_rank)
    s = setup_from_args(args, counts, processes, fsdp)
    peak = training_peak(counts, s)
    tokens = s.target_tokens + s.edit_tokens + s.text_tokens
    auto = getattr(args, "blocks_to_checkpoint", None) == "auto"
    lines = [
        "VRAM plan (diffsynth/utils/vram_planner.py; a prediction, not a measurement)",
        f"  model: Qwen-Image DiT, {counts.num_layers} blocks, {counts.total / 1e9:.2f}B parameters "
        f"({'merged QKV' if args.merged_qkv else 'standard'}); LoRA r={args.lora_rank}: {counts.lora / 1e6:.1f}M "
        "parameters",
        f"  per step: batch {s.batch} x ({s.target_tokens} target + {s.edit_tokens} edit-image + ~{s.text_tokens} text "
        f"tokens = {tokens}), {'bf16' if s.dtype_bytes == 2 else 'fp32'}"
        + (f", {processes} processes (FSDP)" if fsdp and processes > 1 else ""),
        f"  flags: {' '.join(s.flags()) or '(none)'}",
    ]
    if auto:
        lines.append("  --blocks_to_checkpoint auto: decided when the run starts, from the GPU's free memory (with "
                     "--vram_budget, from that); counted here as every block")
    lora_type = getattr(args, "lora_type", "lora")
    if lora_type != "lora":
        lines.append(f"  --lora_type {lora_type}: counted as a LoRA of rank {args.lora_rank} (its own parameter count "
                     "and any extra activations, e.g. DoRA's weight norms, are not modelled)")
    lines += ["  " + x for x in describe(counts, s, peak)]
    optimizer = getattr(args, "optimizer", "adamw")
    lines.append(f"  first step (before the optimizer ({optimizer}"
                 + ("" if optimizer in OPTIMIZER_STATE_BYTES else ", assumed AdamW-sized")
                 + f") allocates its state): {peak.first_step / GIB:.1f} GiB")
    errors = ", ".join(f"{label} {pred:.1f} vs {meas:.1f} GiB ({err:+.1%})"
                       for label, pred, meas, err in calibration_errors())
    lines.append(f"  calibration (first-step peaks measured on an H100, 1024x1024, r=32): {errors}")
    budget = getattr(args, "vram_budget", None)
    if budget:
        total = parse_vram(budget)
        fit = cheapest_fit(counts, s, total)
        head = f"--vram_budget {budget}: {total / GIB:.0f} GiB, keeping {HEADROOM_GIB:.0f} GiB free"
        if fit is None:
            lines.append(f"{head}: NOTHING fits at this batch and size; lower --batch_size, --max_pixels or "
                         "--edit_image_area, or use more GPUs (FSDP)")
        else:
            cand, cpeak, cost = fit
            lines.append(f"{head}: cheapest flags that fit: {' '.join(cand.flags())}")
            lines.append(f"  predicted peak {cpeak.gib():.1f} GiB, estimated step time {cost:.2f}x the "
                         f"all-resident bf16 step{' (both with --compile)' if s.compiled else ''} (H100-based "
                         "estimate, PCIe 4.0 assumed for the copies)")
            if peak.peak <= total - HEADROOM_GIB * GIB:
                lines.append("  your flags fit as given")
            else:
                lines.append(f"  your flags are predicted NOT to fit ({peak.gib():.1f} GiB): use the flags above")
    return "\n".join(lines)


def predicted_training_peak(args, processes=1, fsdp=False) -> float:
    """The planner's steady-state peak for the trainer's flags, in GiB (logged next to the measured one)."""
    counts = dit_counts(merged_qkv=args.merged_qkv, lora_targets=args.lora_target_modules, rank=args.lora_rank)
    return training_peak(counts, setup_from_args(args, counts, processes, fsdp)).gib()
