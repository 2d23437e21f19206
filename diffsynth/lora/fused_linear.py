"""peft's LoRA linear with a leaner forward: the same adapter, fewer passes over the activations.

peft's `lora.Linear.forward` computes `result + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling`. In a trainer
with a bf16 base, fp32 LoRA weights and autocast, that reads and writes activation-sized tensors four times beyond
the three matmuls: x cast to fp32 (autocast casts it back to bf16 for lora_A: a second copy), the product scaled,
then added to the base output. Here the scaling and the addition go into the lora_B matmul itself
(`addmm(result, h, B^T, alpha=scaling)`: the GEMM accumulates into the base output), and the input is cast only
where autocast does not do it anyway. What is left per LoRA layer is its two small matmuls. The merged layout
gains most: its one to_qkv adapter reads x once, where the standard one's q, k and v adapters read it three times.

Anything else (several active adapters, peft's dropout, DoRA and other variants, merged weights, mixed batches, dtypes
that would need peft's promotion) runs peft's own forward, which stays the reference the tests compare against.

`network_dropout` (the trainer's --network_dropout, set by fuse_lora_forward): dropout on the rank activations
h = A x in training, as kohya's LoRAModule (musubi-tuner, ai-toolkit) applies it: y = base(x) + B dropout(h) * s.
peft's own `lora_dropout` drops the input x instead (another regulariser), so it is not used for this. A plain
attribute: the state dict and the saved LoRA files are unchanged, and eval mode (validation, inference) skips it.
"""
import torch
import torch.nn as nn
from peft.tuners.lora import Linear as PeftLoraLinear


class FusedLoraLinear(PeftLoraLinear):
    network_dropout = 0.0  # a class default: layers fused before this attribute existed, or without dropout

    def forward(self, x, *args, **kwargs):
        name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (args or kwargs or name is None or name not in self.lora_A or self.disable_adapters or self.merged
                or name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity)):
            return self._peft_forward(x, *args, **kwargs)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if not torch.is_autocast_enabled(x.device.type) and not x.dtype == A.dtype == B.dtype:
            # mixed dtypes without autocast: peft's casts and promotion decide (decided before the base layer
            # runs: peft's forward runs it itself, and a second base matmul would double the layer's cost)
            return self._peft_forward(x)
        result = self.base_layer(x)
        h = torch.nn.functional.linear(x, A)  # (..., r): small
        if self.network_dropout and self.training:
            h = torch.nn.functional.dropout(h, self.network_dropout)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)

    def _peft_forward(self, x, *args, **kwargs):
        # peft's forward has no place for the rank dropout: training on without it would drop it silently
        if self.network_dropout and self.training:
            raise RuntimeError(
                f"network dropout {self.network_dropout:g} is applied by the fused LoRA forward only, and this layer "
                "takes peft's own forward (several, disabled or merged adapters, a DoRA or other variant, peft's "
                f"lora_dropout, or an input of {x.dtype} without autocast): train one plain LoRA adapter, or "
                "without --network_dropout")
        return super().forward(x, *args, **kwargs)


def fuse_lora_forward(model: nn.Module, network_dropout: float = 0.0) -> int:
    """Give every peft LoRA linear of `model` the fused forward (its class becomes FusedLoraLinear; weights, state
    dict and peft's other methods are unchanged) and its `network_dropout`. Returns the number of layers."""
    count = 0
    for module in model.modules():
        if type(module) in (PeftLoraLinear, FusedLoraLinear):
            module.__class__ = FusedLoraLinear
            module.network_dropout = network_dropout
            count += 1
    return count
