import os

import pytest
import torch

# Two pytest workers share two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                joint_attention_dim=64, in_channels=64, out_channels=16)


@pytest.fixture
def tiny_dit_config():
    return dict(TINY_DIT)


def random_diffusers_dit(zero_cond_t=False, seed=0, std=0.05):
    """diffusers' QwenImageTransformer2DModel with the tiny config and random (non-zero) weights: the oracle."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=zero_cond_t).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model
