"""fp8 base weights: close to the full-precision layer, half the bytes, and no upcast copy kept for backward."""
import torch
import torch.nn as nn

from diffsynth.utils.fp8 import FP8Linear, enable_fp8_linear, weight_bytes


def test_fp8_linear_matches_and_keeps_no_full_precision_weight():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).requires_grad_(False)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    model.load_state_dict(reference.state_dict())
    model.requires_grad_(False)
    assert enable_fp8_linear(model) == 2 and all(isinstance(m, FP8Linear) for m in (model[0], model[2]))
    assert weight_bytes(model) < 0.3 * weight_bytes(reference)  # fp32 -> fp8 + one scale per row
    assert model[0].weight.dtype == torch.float8_e4m3fn and "weight_scale" in dict(model[0].named_buffers())

    x = torch.randn(8, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    y_ref = reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0.1, atol=0.05)  # e4m3 keeps ~2 significant digits
    # nothing saved for backward has a weight's shape in a floating dtype other than fp8
    assert not [t for t in saved if t.shape in ((256, 64), (64, 256)) and t.dtype != torch.float8_e4m3fn]
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert x.grad is not None and torch.nn.functional.cosine_similarity(
        x.grad.flatten(), x_ref.grad.flatten(), dim=0) > 0.99
