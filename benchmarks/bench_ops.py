"""Device-independent counts of one DiT block at the real size: what a GPU would launch and move, without a GPU.

Timings need the GPU; these do not. The DiT (standard, merged, diffusers) is built at the real width on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no data, no compute), so a 1024x1024 edit step is traced in seconds on
any machine. A dispatch mode sees every aten op the eager model runs (each one a kernel on a GPU in eager mode)
and counts, per variant and mode:

- kernels: ops that produce new memory (views and metadata ops excluded);
- GB moved: bytes read plus bytes written by the ops that are NOT matmuls or attention, i.e. the elementwise,
  norm, copy and reduction traffic that is bound by memory bandwidth (a lower bound: every tensor read once);
- TFLOP in the matmuls and the attention (2 per multiply-add; attention forward 4*S^2*width);
- peak MiB: the most tensor bytes alive at once above the weights and inputs (no allocator rounding);
- saved MiB: tensor bytes still alive when the forward returns = what autograd keeps for backward (train mode).

forward = one forward pass without grad in the weights' dtype (bench_dit's forward row); train = one LoRA step
(forward under autocast with fp32 LoRA weights, MSE on the target tokens, backward; no optimizer step, which is the
same for all), as the trainer runs it. Ops are CPU dispatch: a CUDA build takes the same path for these models
except inside attention (one fused kernel either way) and in what autocast casts. CUDA's autocast runs more ops in
fp32 than the CPU's (layer_norm, rms_norm, pow, sum, softmax, ...): `--autocast_rules cuda` (the default) casts
their inputs as CUDA's would, so the train rows count what a GPU runs.

    python benchmarks/bench_ops.py                      # 1 block, 1024x1024 edit, bf16, into BENCHMARKS.md
"""
import argparse
import contextlib
import platform
import sys
import weakref

import peft
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from diffsynth.lora import inject_lora
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV
from diffsynth.utils.benchmarking import (
    COMMON_TARGETS, QKV_TARGETS, VARIANTS, comma_list, command_line, section_markers, write_section,
)
from diffsynth.utils.fp8 import enable_fp8_linear

try:
    import diffusers
except ImportError:
    diffusers = None

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"}
ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"}
# memory without a kernel (allocation without a fill), and views whose schema does not say they alias
ALLOC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
VIEWS = {"detach", "lift_fresh", "_unsafe_view", "_reshape_alias", "set_"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--text_dim", type=int, default=3584)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--text_len", type=int, default=160)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="forward,train")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on every block (train)")
    p.add_argument("--optimizer", action="store_true",
                   help="train: the step ends with AdamW (foreach, as on CUDA); the second step is counted, so the "
                        "optimizer's states exist, and peak GiB adds everything resident (weights, LoRA, states)")
    p.add_argument("--lora_dtype", default="fp32", choices=["fp32", "base"],
                   help="fp32: LoRA weights and AdamW in fp32 under autocast (the trainer); base: in --dtype "
                        "without autocast (the setup of the a521db1 benchmark)")
    p.add_argument("--fp8", default="none", choices=["none", "storage", "compute"],
                   help="frozen linears in fp8: storage (--enable_fp8_training) or compute (--fp8_compute)")
    p.add_argument("--autocast_rules", default="cuda", choices=["cuda", "cpu"],
                   help="which autocast to count the train rows under: CUDA's (ops such as layer_norm run in fp32; "
                        "emulated on the CPU dispatch) or the CPU's own")
    p.add_argument("--top", type=int, default=0, help="also list each variant's N ops moving the most bytes")
    p.add_argument("--section", default="bench_ops")
    p.add_argument("--output", default="BENCHMARKS.md", help="markdown file whose section is rewritten; '' none")
    args = p.parse_args(argv)
    args.width = args.width or args.height
    if args.height % 16 or args.width % 16:
        p.error(f"--height/--width must be multiples of 16, got {args.height}x{args.width}")
    args.variants = comma_list(p, args.variants, "variant", VARIANTS)
    args.modes = comma_list(p, args.modes, "mode", ("forward", "train"))
    args.skipped = []
    if diffusers is None and "diffusers" in args.variants:
        args.variants.remove("diffusers")
        args.skipped.append("diffusers (not installed)")
    return args


# The ops CUDA's autocast runs in fp32 (torch.amp's "CUDA Ops that can autocast to float32") whose CPU autocast
# policy differs, as the Python functions that reach them; matmuls and attention are cast alike on both.
CUDA_FP32 = {F.layer_norm, F.group_norm, F.rms_norm, F.softmax, F.log_softmax, F.mse_loss, F.l1_loss, F.softplus,
             torch.layer_norm, torch.group_norm, torch.rms_norm, torch.softmax, torch.log_softmax,
             torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.__rpow__, torch.rsqrt,
             torch.Tensor.rsqrt, torch.reciprocal, torch.Tensor.reciprocal, torch.exp, torch.Tensor.exp, torch.log,
             torch.Tensor.log, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum, torch.prod,
             torch.Tensor.prod, torch.norm, torch.Tensor.norm, torch.Tensor.softmax, torch.Tensor.log_softmax}


class CudaAutocastRules(TorchFunctionMode):
    """While CPU autocast is on, the half-precision inputs of CUDA_FP32's functions are cast to fp32 first, as
    CUDA's autocast would (a cast kernel each, recorded by autograd like autocast's own)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            def up(t):
                return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t
            args, kwargs = torch.utils._pytree.tree_map(up, (args, kwargs))
        return func(*args, **kwargs)


def _nbytes(t):
    return t.numel() * t.element_size()


class Counter(TorchDispatchMode):
    """Counts kernels, bytes and FLOPs of the aten ops run under it, and tracks the tensor bytes alive."""

    def __init__(self):
        super().__init__()
        self.kernels, self.moved, self.flops = 0, 0, 0
        self.by_op = {}
        self.live = self.peak = 0
        self._seen = weakref.WeakKeyDictionary()  # storage -> bytes, for the storages created under this mode

    def _track(self, t):
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        inplace = name.endswith("_")
        if name in ALLOC:
            for t in outs:
                self._track(t)
            return out
        if name in VIEWS or (not inplace and (aliases or not outs)):  # views, metadata: no kernel, no memory
            return out
        if inplace and not outs:  # void in-place ops (AdamW's _foreach_*_) write their first argument
            outs = [t for t in torch.utils._pytree.tree_leaves(args[0]) if isinstance(t, torch.Tensor)]
        for t in outs if not inplace else ():  # an in-place op allocates nothing
            self._track(t)
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.kernels += 1
        if name in MATMULS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.flops += 2 * a.numel() * b.shape[-1]
        elif name in ATTENTION:
            q, k = args[0], args[1]
            # (B, H, S, D) in both; backward is 2.5x the forward's multiply-adds (recomputes S^2, three grads)
            forward = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
            self.flops += int(forward * 2.5) if "backward" in name else forward
        else:
            moved = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
            self.moved += moved
            count, total = self.by_op.get(name, (0, 0))
            self.by_op[name] = (count + 1, total + moved)
        return out


def build(args, variant, config, dtype, train):
    """A model of `variant` on the meta device, LoRA added as the trainer adds it (peft, ours with the fused
    forward)."""
    with torch.device("meta"):
        if variant == "diffusers":
            diffusers.utils.logging.set_verbosity_error()
            model = diffusers.QwenImageTransformer2DModel(**config)
        else:
            model = (QwenImageDiTMergedQKV if variant == "merged" else QwenImageDiT)(**config)
        model = model.to(dtype)
        targets = QKV_TARGETS[variant] + COMMON_TARGETS
        if train and variant == "diffusers":
            peft.inject_adapter_in_model(peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets),
                                         model)
        elif train:
            inject_lora(model, targets, args.rank)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            # fp32: the trainer's LoRA weights, autocast does the mixing; base: the weights' dtype throughout
            p.data = p.data.to(torch.float32 if args.lora_dtype == "fp32" else dtype)
            p.requires_grad_(True)
    if train and args.checkpointing:
        model.enable_gradient_checkpointing()
    return model.train(train)


def _bytes(tensors):
    storages = {}
    for t in tensors:
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(storages.values())


def count(args, variant, mode):
    h, w = args.height // 16, args.width // 16
    config = dict(num_layers=args.num_layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                  in_channels=64, out_channels=16, joint_attention_dim=args.text_dim)
    dtype, train = DTYPES[args.dtype], mode == "train"
    model = build(args, variant, config, dtype, train)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")  # fake CPU tensors: what the ops see is shapes and dtypes
        if args.fp8 == "storage":
            enable_fp8_linear(model)
        elif args.fp8 == "compute":
            enable_fp8_linear(model, compute=True)
        x = torch.randn(1, 2 * h * w, 64, dtype=dtype)
        text = torch.randn(1, args.text_len, args.text_dim, dtype=dtype)
        t = torch.rand(1)
        target = torch.randn(1, h * w, 64, dtype=dtype)
        shapes = [[(1, h, w), (1, h, w)]]

        def forward():
            if variant == "diffusers":
                return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                             timestep=t, img_shapes=shapes, return_dict=False)[0]
            return model(x, text, None, t, shapes)

        mixed = train and dtype != torch.float32 and args.lora_dtype == "fp32"
        autocast = torch.autocast("cpu", dtype, enabled=mixed)
        rules = CudaAutocastRules() if mixed and args.autocast_rules == "cuda" else contextlib.nullcontext()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if train and args.optimizer else None

        def step():
            with rules:  # in the backward too: a checkpointed block's recompute casts as its forward did
                with autocast:
                    loss = F.mse_loss(forward()[:, :h * w].float(), target.float())
                saved = counter.live  # what autograd holds for backward (and the loss)
                loss.backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return saved

        counter = Counter()  # the warm-up's: not reported
        with counter:
            if optimizer:
                step()  # the first step creates AdamW's states
            with torch.no_grad(), rules, autocast:
                forward()  # fills the RoPE cache outside the count, as any step after the first finds it
        counter = Counter()
        with counter:
            if train:
                saved = step()
                for p in params:
                    p.grad = None
            else:
                with torch.no_grad():
                    forward()
                saved = None
        resident = _bytes([*model.parameters(), *model.buffers(), x, text, t, target]
                          + [v for state in (optimizer.state.values() if optimizer else ()) for v in state.values()
                             if isinstance(v, torch.Tensor)])
    return {"kernels": counter.kernels, "moved": counter.moved, "flops": counter.flops, "peak": counter.peak,
            "saved": saved, "resident": resident, "by_op": counter.by_op}


def fmt_table(args, results):
    lines = ["| mode | variant | kernels | GB moved (non-matmul) | TFLOP (matmul + attention) | peak MiB | saved MiB |"
             " resident GiB | peak + resident GiB | x standard (kernels / GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (mode, variant), r in results.items():
        std = results.get((mode, "standard"))
        ratio = (f"{r['kernels'] / std['kernels']:.2f} / {r['moved'] / std['moved']:.2f}"
                 if std and variant != "standard" else "-")
        saved = f"{r['saved'] / 2**20:.0f}" if r["saved"] is not None else "-"
        lines.append(f"| {mode} | {variant} | {r['kernels']} | {r['moved'] / 1e9:.2f} | {r['flops'] / 1e12:.2f} | "
                     f"{r['peak'] / 2**20:.0f} | {saved} | {r['resident'] / 2**30:.2f} | "
                     f"{(r['peak'] + r['resident']) / 2**30:.2f} | {ratio} |")
    return lines


def fmt_top(args, results):
    lines = []
    for (mode, variant), r in results.items():
        ops = sorted(r["by_op"].items(), key=lambda kv: kv[1][1], reverse=True)[:args.top]
        lines += ["", f"{mode}, {variant}: the non-matmul ops moving the most bytes", "",
                  "| op | calls | GB |", "|---|---:|---:|"]
        lines += [f"| `{name}` | {calls} | {moved / 1e9:.2f} |" for name, (calls, moved) in ops]
    return lines


def render(args, argv, results):
    start, end = section_markers(args.section)
    h, w = args.height // 16, args.width // 16
    text = [start, f"## What {args.num_layers} DiT block(s) launch and move, counted without a GPU (`benchmarks/bench_ops.py`)", "",
            f"- Command: `{command_line('bench_ops.py', argv)}`",
            f"- Counted with torch {torch.__version__} (CPU dispatch, fake tensors: no data, no compute), "
            f"diffusers {diffusers.__version__ if diffusers else 'absent'}, peft {peft.__version__}, "
            f"Python {platform.python_version()}. Counts, not timings: the same on any machine with these versions.",
            f"- Model: {args.num_layers} block(s) at width {args.heads * args.head_dim} ({args.heads} heads x "
            f"{args.head_dim}), {args.dtype} weights{'' if args.fp8 == 'none' else ', frozen linears in fp8 (' + args.fp8 + ')'}. Input: batch 1, {args.height}x{args.width} edit = "
            f"{h * w} target + {h * w} edit-image tokens + {args.text_len} text tokens.",
            "- forward: no grad, in the weights' dtype. train: one LoRA step (r=" + str(args.rank) + " on q/k/v or "
            "to_qkv/add_qkv_proj, to_out.0, to_add_out, the MLP linears; "
            + (f"fp32 LoRA weights under autocast ({args.autocast_rules.upper()}'s rules)" if args.lora_dtype == "fp32"
               else
               f"LoRA weights in {args.dtype}, no autocast")
            + ("; gradient checkpointing on every block" if args.checkpointing else "")
            + "; MSE; backward; " + ("AdamW (foreach), the second step counted" if args.optimizer else
                                     "no optimizer step") + ").",
            "- kernels: aten ops that make new memory (views excluded): one GPU kernel launch each in eager mode. "
            "GB moved: bytes read + written by every op that is not a matmul or attention (a lower bound, each "
            "operand read once): the memory-bound share of the step. resident GiB: weights, LoRA, inputs and (with "
            "--optimizer) AdamW's states. peak MiB: most tensor bytes alive at once above that; peak + resident: "
            "what a GPU would hold at the peak, before its allocator's rounding and workspaces. saved MiB: bytes "
            "alive when the forward returns, i.e. what backward needs.", ""]
    text += fmt_table(args, results)
    if args.top:
        text += fmt_top(args, results)
    for variant in args.skipped:
        text.append(f"\n- Skipped variant: {variant}.")
    text.append(end)
    return "\n".join(text) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    results = {}
    for mode in args.modes:
        for variant in args.variants:
            print(f"[bench_ops] {mode}, {variant}", file=sys.stderr, flush=True)
            results[(mode, variant)] = count(args, variant, mode)
    text = render(args, argv, results)
    print(text)
    if args.output:
        write_section(args.output, args.section, text)
        print(f"wrote the {args.section} section of {args.output}")
    return results


if __name__ == "__main__":
    main()
