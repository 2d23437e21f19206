"""Frozen linear weights stored in float8_e4m3fn: about half the weight memory of bf16.

Each output row gets its own scale (absmax / 448, e4m3's largest normal value), so the small weights of a
transformer keep their relative precision instead of falling into e4m3's subnormal range.

Two ways to compute with them, same storage:
- storage only (`--enable_fp8_training`): the weight is upcast per op and the matmul runs in the compute dtype;
- fp8 compute (`--fp8_compute`): the activations are quantised per token (row) to e4m3 on the fly and the matmul
  runs in fp8 with the two row-wise scales (torch._scaled_mm), in the forward and in the input-gradient of the
  backward. GPUs with compute capability 8.9+ (Ada, Hopper, Blackwell) have fp8 tensor cores; torch also runs
  _scaled_mm on the CPU, which is how the tests check the numerics.

Why not torchao: its float8 training (`convert_to_float8_training`, rowwise recipe) keeps the weight in high
precision and casts it per step, so the weights take bf16 memory, twice this; its fp8 inference tensors
(`Float8DynamicActivationFloat8WeightConfig(PerRow())`) store what we store, but their backward (grad @ W, W's
scale then runs along the reduced dimension) dequantises the weight and runs a bf16 matmul, and torchao 0.18
refuses to build them without an fp8 GPU, so nothing could be tested here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class _FP8Linear(torch.autograd.Function):
    """y = x W^T + b with W upcast from fp8 on the fly, in forward AND backward.

    A plain `F.linear(x, w8.to(dtype) * scale)` would make autograd keep the upcast weight for the backward
    pass: one full-precision copy of every layer alive at once, which is more memory than no fp8 at all.
    Here only the fp8 weight and its scale (which exist anyway) are saved. W and b are frozen: no grads.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)), None, None, None


def quantize_rows(x):
    """(rows, n) -> (e4m3 values, fp32 scales (rows, 1)) with x ~= values * scales: one absmax scale per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _compute_dtype(x):
    # what F.linear would return here: the autocast dtype inside autocast, else the input's
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _scaled_mm(a8, b8, scale_a, scale_b, dtype, bias=None, fast_accum=False):
    """a8 @ b8 with row scales, in `dtype`. `bias` is added in the kernel's epilogue where the kernel writes `dtype`
    (as F.linear's GEMM does: no extra pass over the output). `fast_accum`: Hopper's fp8 tensor cores accumulate
    without promoting to fp32 every few K-steps; the CPU ignores it."""
    # CUDA's row-wise kernels write bf16 only, and take a bias only in the output's dtype; another compute dtype is
    # cast afterwards, with the bias added in it
    mm_dtype = torch.bfloat16 if a8.device.type == "cuda" else dtype
    fused_bias = bias.to(mm_dtype) if bias is not None and mm_dtype == dtype else None
    y = torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, bias=fused_bias, out_dtype=mm_dtype,
                         use_fast_accum=fast_accum).to(dtype)
    return y if bias is None or fused_bias is not None else y + bias.to(dtype)


class _FP8MatmulLinear(torch.autograd.Function):
    """y = x W^T + b as an fp8 matmul: x quantised per token, W (e4m3, one scale per output row) as stored.

    Backward, input gradient only (W and b are frozen): dx = g W = (g * s_W) W8, with W's row scales s_W folded
    into g's columns before g is quantised per token, so both operands of the fp8 matmul are plain e4m3 with row
    scales. _scaled_mm wants its second operand column-major: for the forward that is W8^T as stored, for the
    backward W8 itself, which needs a transposed fp8 copy that lives for this one matmul. Nothing but the stored
    fp8 weight and its scales is saved for backward.

    Accumulation as torchao's float8 training sets it by default: the forward GEMM with fast accumulation (torch's
    row-wise CUTLASS kernel is markedly slower without it), the input gradient with fp32 promotion (it flows on
    through every layer below).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        dtype = _compute_dtype(x)
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        y = _scaled_mm(x8, weight.t(), x_scale, scale.t(), dtype, bias=bias, fast_accum=True)
        ctx.save_for_backward(weight, scale)
        ctx.input_dtype = x.dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        g8, g_scale = quantize_rows(grad.reshape(-1, grad.shape[-1]) * scale.t())
        column_major = weight.t().contiguous().t()
        ones = torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device)
        dx = _scaled_mm(g8, column_major, g_scale, ones, grad.dtype)
        return dx.reshape(*grad.shape[:-1], -1).to(ctx.input_dtype), None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose frozen weight is float8 with a per-row scale; the state-dict key stays `weight`.
    `fp8_compute` picks the fp8 matmul over the upcast one."""

    fp8_compute = False

    def forward(self, x):
        fn = _FP8MatmulLinear if self.fp8_compute else _FP8Linear
        return fn.apply(x, self.weight, self.weight_scale, self.bias)


def fp8_compute_problem(device) -> str | None:
    """Why fp8 matmuls cannot run on `device` (a sentence), or None when they can."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; fp8 matmuls need "
                    "8.9 or newer (Ada, Hopper, Blackwell)")
    try:  # what a layer does, at the smallest size CUDA's fp8 kernels take
        a8, a_scale = quantize_rows(torch.ones(16, 16, device=device))
        bias = torch.zeros(16, device=device, dtype=torch.bfloat16)
        _scaled_mm(a8, a8.t(), a_scale, a_scale.t(), torch.bfloat16, bias=bias, fast_accum=True)  # the forward's
        _scaled_mm(a8, a8.t(), a_scale, a_scale.t(), torch.bfloat16)  # the backward's
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"torch {torch.__version__} cannot run row-wise scaled fp8 matmuls on {device.type} ({e})"
    return None


def enable_fp8_linear(model: nn.Module, compute: bool = False, device=None) -> int:
    """Store every frozen base nn.Linear weight of `model` in float8 (LoRA layers are left alone); with `compute`,
    their matmuls run in fp8 too (check `fp8_compute_problem` first). `device`: where to convert (e.g. the GPU for
    a model held in host memory); each result stays where its weight was. Returns the number of layers converted."""
    count = 0
    for name, module in model.named_modules():
        # LoRA's own A/B linears stay as they are, even frozen ones: peft casts its input to their dtype
        if type(module) is nn.Linear and not module.weight.requires_grad and ".lora_" not in f".{name}":
            home = module.weight.device
            w = module.weight.data.to(device or home).float()
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
            module.weight = nn.Parameter((w / scale).to(FP8).to(home), requires_grad=False)
            module.register_buffer("weight_scale", scale.to(home, torch.float32))
            module.__class__ = FP8Linear
            count += 1
        if isinstance(module, FP8Linear):
            # CUDA's fp8 kernels take sizes that are multiples of 16; another layer keeps the upcast matmul
            module.fp8_compute = compute and module.in_features % 16 == 0 and module.out_features % 16 == 0
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers: what fp8 storage is meant to halve."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def enable_fp8(model: nn.Module, compute: bool, device) -> str:
    """fp8 storage for the frozen linears of `model`, with fp8 matmuls too if `compute` and `device` can run them
    (else storage only). -> the line that says what was done, and why not fp8 compute where it was asked for."""
    problem = fp8_compute_problem(device) if compute else None
    count = enable_fp8_linear(model, compute=compute and problem is None, device=device)
    if not compute:
        return f"fp8: {count} frozen linear layers stored in float8_e4m3fn"
    if problem:
        return (f"--fp8_compute: {problem}; falling back to fp8 storage (--enable_fp8_training): {count} frozen linear "
                "layers stored in float8_e4m3fn, matmuls in the compute dtype")
    fast = sum(1 for m in model.modules() if isinstance(m, FP8Linear) and m.fp8_compute)
    return (f"fp8 compute: {count} frozen linear layers stored in float8_e4m3fn, {fast} of them with fp8 matmuls "
            "(activations scaled per token)")
