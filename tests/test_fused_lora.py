"""The fused LoRA forward (diffsynth/lora/fused_linear.py) against peft's own forward, which stays the reference."""
import pytest
import torch
import torch.nn as nn
from peft.tuners.lora import Linear as PeftLoraLinear

from diffsynth.lora import inject_lora, lora_state_dict
from diffsynth.lora.fused_linear import FusedLoraLinear


def pair(alpha=8.0, dtype=torch.float32):
    """Two identical one-layer models with a LoRA (rank 4, non-zero B): one fused, one with peft's forward."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 192)).requires_grad_(False)
        inject_lora(model, "0", 4, alpha=alpha)
        with torch.no_grad():
            model[0].lora_B["default"].weight.normal_()
        model[0].base_layer.to(dtype)
        models.append(model)
    assert type(models[0][0]) is FusedLoraLinear
    models[1][0].__class__ = PeftLoraLinear
    return models


def run(model, x, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().sum().backward()
    return y, x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("alpha", [4.0, 6.0])  # scaling 1 and 1.5
def test_fused_equals_peft_in_fp32(alpha):
    fused, reference = pair(alpha)
    x = torch.randn(3, 5, 64)
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = run(fused, x), run(reference, x)
    assert grads.keys() == grads_ref.keys() == {"0.lora_A.default.weight", "0.lora_B.default.weight"}
    # fp32 rounding only: the scaling multiplies inside the GEMM instead of after it
    for a, b in [(y, y_ref), (dx, dx_ref)] + [(grads[n], grads_ref[n]) for n in grads]:
        assert ((a - b).norm() / b.norm()).item() < 1e-6


def test_fused_under_autocast_with_a_bf16_base_is_at_least_as_close_to_fp32():
    """The trainer's case: bf16 base, fp32 LoRA, autocast. peft rounds the scaled product and the sum separately;
    the fused GEMM accumulates into the base output: no further from the fp32 computation than peft."""
    fused, reference = pair(alpha=6.0, dtype=torch.bfloat16)
    exact, _ = pair(alpha=6.0)
    exact[0].base_layer.weight.data = reference[0].base_layer.weight.data.float()
    exact[0].base_layer.bias.data = reference[0].base_layer.bias.data.float()
    x = torch.randn(3, 5, 64).bfloat16()
    y, dx, grads = run(fused, x, autocast=True)
    y_ref, dx_ref, grads_ref = run(reference, x, autocast=True)
    y_exact = exact(x.float())
    assert y.dtype == y_ref.dtype == torch.bfloat16
    error = lambda a: ((a.float() - y_exact).norm() / y_exact.norm()).item()  # noqa: E731
    assert error(y) <= error(y_ref) * 1.01 and error(y) < 1e-2
    for name in grads:
        assert ((grads[name] - grads_ref[name]).norm() / grads_ref[name].norm()) < 2e-2, name


def test_other_cases_run_peft_forward(monkeypatch):
    fused, _ = pair()
    calls = []
    real = PeftLoraLinear.forward
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(2, 64)
    fused(x)
    assert calls == []  # the fused path
    fused[0].base_layer.to(torch.bfloat16)
    base_calls = []
    hook = fused[0].base_layer.register_forward_hook(lambda *_: base_calls.append(1))
    fused(x.bfloat16())  # mixed dtypes without autocast: peft's casts and promotion
    assert calls == [1]
    assert base_calls == [1]  # the base matmul ran once, inside peft's forward, not also before it
    hook.remove()
    fused[0].base_layer.float()
    fused[0].lora_dropout["default"] = nn.Dropout(0.1)
    fused(x)
    assert calls == [1, 1]


def test_inject_lora_keeps_keys_and_state_dict():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)).requires_grad_(False)
    inject_lora(model, "0,1", 4)
    assert all(type(m) is FusedLoraLinear for m in model)
    assert sorted(lora_state_dict(model)) == ["0.lora_A.weight", "0.lora_B.weight", "1.lora_A.weight",
                                              "1.lora_B.weight"]
