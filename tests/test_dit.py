"""The two DiTs against diffusers, against each other, and their gradients."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DIT, random_diffusers_dit
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV, merge_qkv_state_dict, split_qkv_state_dict
from diffsynth.models.qwen_image_dit_merged_qkv import QKVLayoutError

# target 4x6 tokens, one edit image of another size (6x4), as in an edit batch
SHAPES = [(1, 4, 6), (1, 6, 4)]


def edit_batch(batch=2, text_len=7, pad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 48, 64, generator=g)
    text = torch.randn(batch, text_len, 64, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if pad:
        mask[1, 4:] = 0
    t = torch.rand(batch, generator=g)
    return x, text, mask, t, [SHAPES] * batch


def build(cls, reference, zero_cond_t):
    model = cls(**{k: v for k, v in reference.config.items() if k in (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
        "joint_attention_dim", "axes_dims_rope", "zero_cond_t")}).eval()
    sd = reference.state_dict()
    model.load_state_dict(merge_qkv_state_dict(sd) if cls is QwenImageDiTMergedQKV else sd, strict=True)
    return model


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("cls", [QwenImageDiT, QwenImageDiTMergedQKV])
def test_parity_with_diffusers(cls, zero_cond_t):
    reference = random_diffusers_dit(zero_cond_t)
    model = build(cls, reference, zero_cond_t)
    x, text, mask, t, shapes = edit_batch()
    with torch.no_grad():
        expected = reference(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                             timestep=t, img_shapes=shapes, return_dict=False)[0]
        out = model(x, text, mask, t, shapes)
    assert out.shape == (2, 48, 64)
    assert expected.abs().max() > 1e-2  # a degenerate (constant) model would make parity meaningless
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # the padded sample differs from what it would be without the mask: the mask is really applied
    with torch.no_grad():
        unmasked = model(x, text, None, t, shapes)
    assert not torch.allclose(unmasked[1], out[1], atol=1e-4)
    assert torch.allclose(unmasked[0], out[0], atol=1e-5)


def test_no_mask_reaches_sdpa_without_padding(monkeypatch):
    model = build(QwenImageDiT, random_diffusers_dit(), False)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x, text, mask, t, shapes = edit_batch(pad=False)
    with torch.no_grad():
        model(x, text, mask, t, shapes)
        assert seen and all(m is None for m in seen)
        seen.clear()
        model(*edit_batch(pad=True))
        assert seen and all(m is not None for m in seen)


def test_different_img_shapes_in_a_batch_raise():
    model = build(QwenImageDiT, random_diffusers_dit(), False)
    x, text, mask, t, _ = edit_batch()
    with pytest.raises(ValueError, match="same img_shapes"):
        model(x, text, mask, t, [SHAPES, [(1, 6, 4), (1, 4, 6)]])
    with pytest.raises(ValueError, match="describe 24 tokens"):
        model(x, text, mask, t, [[(1, 4, 6)]] * 2)


def test_merged_gradient_is_concatenated_qkv_gradients():
    reference = random_diffusers_dit()
    standard, merged = build(QwenImageDiT, reference, False), build(QwenImageDiTMergedQKV, reference, False)
    batch = edit_batch()
    standard(*batch).square().mean().backward()
    merged(*batch).square().mean().backward()
    for i in range(2):
        s, m = standard.transformer_blocks[i].attn, merged.transformer_blocks[i].attn
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("add_qkv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for param in ("weight", "bias"):
                expected = torch.cat([getattr(getattr(s, p), param).grad for p in parts])
                got = getattr(getattr(m, fused), param).grad
                assert got.abs().max() > 0
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("cls", [QwenImageDiT, QwenImageDiTMergedQKV])
def test_gradient_checkpointing_gives_same_gradients(cls, offload):
    reference = random_diffusers_dit(zero_cond_t=True)
    plain, ckpt = build(cls, reference, True), build(cls, reference, True)
    ckpt.enable_gradient_checkpointing(offload=offload)
    batch = edit_batch()
    out_plain, out_ckpt = plain(*batch), ckpt(*batch)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    compared = 0
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        # the last block's text-stream output is unused, so its text MLP gets no gradient, in both runs
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-8, msg=name)
            compared += 1
    assert compared > 0.8 * len(list(plain.parameters()))


@pytest.mark.parametrize("cls", [QwenImageDiT, QwenImageDiTMergedQKV])
def test_checkpointing_only_the_last_blocks(cls, monkeypatch):
    """enable_gradient_checkpointing(blocks=N): only the last N blocks run under checkpoint, the others keep their
    activations; outputs and gradients equal those of checkpointing every block and of none."""
    torch.manual_seed(0)
    weights = cls(**dict(TINY_DIT, num_layers=3)).state_dict()
    weights = {k: torch.randn_like(v) * 0.05 for k, v in weights.items()}

    def build3():
        model = cls(**dict(TINY_DIT, num_layers=3))
        model.load_state_dict(weights)
        return model

    runs = {}
    real = torch.utils.checkpoint.checkpoint
    for blocks in (None, 1, 3, "off"):
        model = build3()
        if blocks != "off":
            model.enable_gradient_checkpointing(blocks=blocks)
        ran = []
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                            lambda fn, *a, **k: ran.append(list(model.transformer_blocks).index(fn)) or real(fn, *a, **k))
        out = model(*edit_batch())
        out.square().mean().backward()
        runs[blocks] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ran)
    assert [runs[b][2] for b in (None, 1, 3, "off")] == [[0, 1, 2], [2], [0, 1, 2], []]
    for blocks in (1, 3, "off"):
        torch.testing.assert_close(runs[blocks][0], runs[None][0], rtol=0, atol=0)
        assert runs[blocks][1].keys() == runs[None][1].keys()
        for name, grad in runs[None][1].items():
            torch.testing.assert_close(runs[blocks][1][name], grad, rtol=1e-6, atol=1e-8, msg=f"{blocks}: {name}")
    model = build3()
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"blocks_to_checkpoint {bad}: the DiT has 3 blocks; checkpoint 1 to 3"):
            model.enable_gradient_checkpointing(blocks=bad)


def test_offload_moves_saved_block_inputs_to_cpu(monkeypatch):
    """With offload on, checkpointing runs under save_on_cpu; without it, it does not."""
    calls = []
    real = torch.autograd.graph.save_on_cpu

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    model = build(QwenImageDiT, random_diffusers_dit(), False)
    model.enable_gradient_checkpointing(offload=False)
    model(*edit_batch()).sum().backward()
    assert calls == []
    model.enable_gradient_checkpointing(offload=True)
    model(*edit_batch()).sum().backward()
    assert len(calls) == 2  # one per block


def test_merge_split_round_trip_and_errors():
    sd = random_diffusers_dit().state_dict()
    merged = merge_qkv_state_dict(sd)
    assert "transformer_blocks.0.attn.to_qkv.weight" in merged
    assert merged["transformer_blocks.1.attn.add_qkv_proj.bias"].shape == (3 * 64,)
    assert not any(k.endswith("attn.to_q.weight") for k in merged)
    back = split_qkv_state_dict(merged)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # q, k, v order
    torch.testing.assert_close(merged["transformer_blocks.0.attn.to_qkv.weight"][64:128],
                               sd["transformer_blocks.0.attn.to_k.weight"], rtol=0, atol=0)

    with pytest.raises(QKVLayoutError, match="already in the merged-QKV layout"):
        merge_qkv_state_dict(merged)
    with pytest.raises(QKVLayoutError, match="already in the standard layout"):
        split_qkv_state_dict(sd)
    broken = dict(sd)
    broken["transformer_blocks.0.attn.to_v.weight"] = torch.zeros(32, 64)
    with pytest.raises(QKVLayoutError, match="q/k/v shapes differ.*to_v.weight=\\(32, 64\\)"):
        merge_qkv_state_dict(broken)
    del broken["transformer_blocks.0.attn.to_v.weight"]
    with pytest.raises(QKVLayoutError, match="missing transformer_blocks.0.attn.to_v.weight"):
        merge_qkv_state_dict(broken)
    bad = dict(merged)
    bad["transformer_blocks.0.attn.to_qkv.weight"] = torch.zeros(100, 64)
    with pytest.raises(QKVLayoutError, match="not a multiple of 3"):
        split_qkv_state_dict(bad)


def test_unused_in_output_lists_exactly_the_parameters_without_gradient():
    model = build(QwenImageDiTMergedQKV, random_diffusers_dit(), False)
    model(*edit_batch()).square().mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    prefixes = tuple(m + "." for m in model.unused_in_output())
    assert no_grad and no_grad == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def complex_norm_rope(x, norm, freqs):
    """The reference prologue of one stream as diffusers writes it: RMSNorm module, then RoPE on complex tensors."""
    x = norm(x)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_equals_the_complex_reference(dtype, compiling, monkeypatch):
    """Both of norm_rope's paths (complex rotation in eager mode, real under torch.compile) equal diffusers'
    RMSNorm + complex RoPE bit for bit."""
    from diffsynth.models.qwen_image_dit import QwenImageRoPE, RMSNorm, norm_rope

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)

    rope = QwenImageRoPE((8, 12, 12))
    shapes, text_len = [(1, 4, 6), (1, 6, 4)], 5
    cos, sin = rope(shapes, text_len, "cpu")
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], -sin[:, 1::2])  # pairs' layout
    freqs = torch.complex(cos[:, 0::2], sin[:, 1::2])  # the tables are torch.polar's, as diffusers builds its own
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, text_len + 48, 3, 32, generator=g) * 3).to(dtype)
    norm_text, norm_image = RMSNorm(32).to(dtype), RMSNorm(32).to(dtype)
    with torch.no_grad():
        norm_text.weight.normal_(generator=g)
        norm_image.weight.normal_(generator=g)
    expected = torch.cat([complex_norm_rope(x[:, :text_len], norm_text, freqs[:text_len]),
                          complex_norm_rope(x[:, text_len:], norm_image, freqs[text_len:])], dim=1)
    got = norm_rope(x, text_len, norm_text.weight, norm_image.weight, cos, sin)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same roundings in the same order
    # q and k of both streams at once (the merged layout's pass): each slice as on its own
    qk = torch.stack([x, x.flip(-1)], dim=2)
    weights = [torch.stack([w, w.flip(-1)])[:, None] for w in (norm_text.weight, norm_image.weight)]
    both = norm_rope(qk, text_len, *weights, cos, sin)
    torch.testing.assert_close(both[:, :, 0], got, rtol=0, atol=0)
    torch.testing.assert_close(both[:, :, 1], norm_rope(x.flip(-1), text_len, norm_text.weight.flip(-1),
                                                        norm_image.weight.flip(-1), cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_two_rotations_are_equal_forward_and_backward(dtype):
    """norm_rope rotates with complex ops in eager mode and with real ones under torch.compile: one function,
    two implementations that must agree bit for bit, values and gradients."""
    from diffsynth.models.qwen_image_dit import QwenImageRoPE, rotate_complex, rotate_real

    cos, sin = QwenImageRoPE((8, 12, 12))([(1, 4, 6), (1, 6, 4)], 5, "cpu")
    cos, sin = cos[:, None, None], sin[:, None, None]  # (S, 1, 1, D): over q/k and the heads
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 53, 2, 3, 32, generator=g) * 3).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    outs, grads = [], []
    for rotate in (rotate_real, rotate_complex):
        leaf = x.clone().requires_grad_(True)
        out = rotate(leaf, cos, sin)
        out.backward(grad)
        outs.append(out)
        grads.append(leaf.grad)
    assert outs[0].dtype == outs[1].dtype == dtype
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert not torch.equal(outs[0], x)  # it rotated something


@pytest.mark.parametrize("cls", [QwenImageDiT, QwenImageDiTMergedQKV])
def test_block_graph_has_no_complex_op_and_no_break(cls):
    """What torch.compile sees of a block: one graph (no graph break), no complex tensor anywhere in it."""
    model = build(cls, random_diffusers_dit(zero_cond_t=True), True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    block = model.transformer_blocks[0]
    block.forward = torch.compile(block.forward, backend=record, fullgraph=True)
    x, text, mask, t, shapes = edit_batch()
    with torch.no_grad():
        model(x, text, mask, t, shapes)
    assert len(graphs) == 1
    dtypes = {n.meta["example_value"].dtype for n in graphs[0].graph.nodes
              if isinstance(n.meta.get("example_value"), torch.Tensor)}
    assert torch.float32 in dtypes and not any(d.is_complex for d in dtypes), dtypes
    torch._dynamo.reset()
