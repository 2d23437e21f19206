"""Frozen linear weights stored in float8_e4m3fn, upcast per op: about half the weight memory of bf16.

Each output row gets its own scale (absmax / 448, e4m3's largest normal value), so the small weights of a
transformer keep their relative precision instead of falling into e4m3's subnormal range.
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


class FP8Linear(nn.Linear):
    """nn.Linear whose frozen weight is float8 with a per-row scale; the state-dict key stays `weight`."""

    def forward(self, x):
        return _FP8Linear.apply(x, self.weight, self.weight_scale, self.bias)


def enable_fp8_linear(model: nn.Module, device=None) -> int:
    """Store every frozen base nn.Linear weight of `model` in float8 (LoRA layers are left alone).
    `device`: where to compute (e.g. the GPU for a model held in host memory); each result stays where its weight
    was. Returns the number of layers converted."""
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
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers: what fp8 storage is meant to halve."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
