"""Qwen-Image DiT (MMDiT: an image stream and a text stream meeting in joint attention).

Module names are the official state-dict keys (diffusers' `QwenImageTransformer2DModel` layout), so the released
`transformer/diffusion_pytorch_model*.safetensors` load with strict key checking. The merged-QKV variant in
`qwen_image_dit_merged_qkv.py` subclasses the attention and the model; everything else lives here, once.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


class RMSNorm(nn.Module):
    # Statistics in fp32; result cast to the weight's dtype when that is half precision (as diffusers does).
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm without affine weights that returns its input's dtype under autocast too. CUDA's autocast runs
    layer_norm in fp32 and returns fp32: the modulation after it and the next linear's input cast would then pass
    over fp32 activations (an eager bf16 LoRA step moved 27% more bytes that way, benchmarks/bench_ops.py). The
    kernel accumulates in fp32 either way; the result is what inference, which runs without autocast, computes."""

    def __init__(self, dim, eps=1e-6):
        super().__init__(dim, elementwise_affine=False, eps=eps)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t, dtype):
        # Sinusoidal features of t * 1000 (t in [0, 1]), cos first (flip_sin_to_cos), computed in fp32.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None] * 1000  # this order of rounding is diffusers'
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class TimeTextEmbed(nn.Module):
    # Only a container, so that the keys read `time_text_embed.timestep_embedder.*`.
    def __init__(self, dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t, dtype):
        return self.timestep_embedder(t, dtype)


class QwenImageRoPE(nn.Module):
    """3-axis rotary embedding: (frame, height, width) for image tokens, one shared index for text tokens.

    Height and width indices are centred on 0; the frame index of an image is its position in `img_shapes`
    (target 0, edit images 1, 2, ...). Text positions start after the largest centred image index.
    """

    def __init__(self, axes_dims=(16, 56, 56), theta=10000):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.theta = theta
        self._cache = {}

    def _axis(self, positions, dim):
        inv = 1.0 / torch.pow(self.theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(positions.float(), inv)
        # torch.polar's cos/sin, as diffusers builds them: torch.cos/sin differ from it in the last bit
        return torch.polar(torch.ones_like(angles), angles)

    def _image(self, index, frames, h, w):
        af, ah, aw = self.axes_dims
        f = self._axis(torch.arange(index, index + frames), af)
        y = self._axis(torch.arange(-(h - h // 2), h // 2), ah)
        x = self._axis(torch.arange(-(w - w // 2), w // 2), aw)
        return torch.cat([
            f[:, None, None].expand(frames, h, w, -1),
            y[None, :, None].expand(frames, h, w, -1),
            x[None, None, :].expand(frames, h, w, -1),
        ], dim=-1).reshape(frames * h * w, -1)

    def forward(self, shapes, text_len, device):
        """shapes: list of (frames, h, w) of one sample -> (cos, sin), each (text_len + image tokens, D) fp32, rows
        in the order attention joins the tokens: text first, then the images. Laid out for the interleaved pairs
        of the head dim: cos holds each pair's cosine twice, sin its sine as (-sin, sin), so that the rotation is
        x * cos + (x with each pair swapped) * sin. Built once per shape, so the blocks (and a compiled graph)
        see only real tensors."""
        key = (tuple(map(tuple, shapes)), int(text_len), str(device))
        if key not in self._cache:
            image = torch.cat([self._image(i, *shape) for i, shape in enumerate(shapes)])
            start = max(max(h // 2, w // 2) for _, h, w in shapes)
            positions = torch.arange(start, start + text_len)
            text = torch.cat([self._axis(positions, d) for d in self.axes_dims], dim=-1)
            freqs = torch.cat([text, image])
            if len(self._cache) > 64:
                self._cache.clear()
            cos = freqs.real.repeat_interleave(2, dim=-1)
            sin = torch.stack([-freqs.imag, freqs.imag], dim=-1).flatten(-2)
            self._cache[key] = (cos.to(device), sin.to(device))
        return self._cache[key]


def norm_rope(x, text_len, text_weight, image_weight, cos, sin, eps=1e-6):
    """The q/k prologue in one function: RMSNorm over the head dim, then the rotary embedding.

    x: (B, S, ..., D), text tokens first (S = text_len + image tokens); text_weight / image_weight: the norm
    weights of the two streams, broadcastable to x's dims after S; cos, sin: (S, D) from QwenImageRoPE.
    The rounding is the reference's (diffusers' RMSNorm and apply_rotary_emb_qwen): statistics in fp32, the
    normalised value cast to a half-precision weight's dtype before the weight multiplies it, the rotation in
    fp32, the result in the normalised value's dtype.
    """
    per_token = (x.shape[1],) + (1,) * (x.dim() - 3)  # broadcast over the heads (and q/k) after S
    is_text = (torch.arange(x.shape[1], device=x.device) < text_len).view(*per_token, 1)
    weight = torch.where(is_text, text_weight, image_weight)
    x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    x = x * weight
    cos, sin = cos.view(*per_token, -1), sin.view(*per_token, -1)
    rotate = rotate_real if torch.compiler.is_compiling() else rotate_complex
    return rotate(x, cos, sin)


# Rotating the interleaved pair (x0, x1) by the angle a is the complex product (x0 + i x1)(cos a + i sin a). Two
# implementations of it, equal bit for bit (tests/test_dit.py; -(x1 sin) and the order of a sum round alike).
# Under torch.compile the real one: elementwise only, so inductor fuses norm and rotation into one kernel whatever
# its heuristics for cat (it cannot generate code for complex ops). In eager mode the complex one: one pass over the
# data where the real one makes four (benchmarks/bench_ops.py counts the bytes).
def rotate_real(x, cos, sin):
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return (xf * cos + swapped * sin).to(x.dtype)


def rotate_complex(x, cos, sin):
    freqs = torch.complex(cos[..., 0::2], sin[..., 1::2])
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class QwenImageAttention(nn.Module):
    """Joint attention. Subclasses change only how q, k, v are projected (`_make_qkv`, `prologue`)."""

    def __init__(self, dim, num_heads, head_dim, eps=1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self._make_qkv(dim)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(dim, dim)

    def _make_qkv(self, dim):
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def prologue(self, image, text, rope):
        """Projections -> SDPA-ready q, k, v (B, H, S, D): text tokens first, q and k normalised and rotated."""
        heads = (self.num_heads, self.head_dim)
        q, k, v = (torch.cat(pair, dim=1).unflatten(-1, heads) for pair in (
            (self.add_q_proj(text), self.to_q(image)), (self.add_k_proj(text), self.to_k(image)),
            (self.add_v_proj(text), self.to_v(image))))
        eps, text_len = self.norm_q.eps, text.shape[1]
        q = norm_rope(q, text_len, self.norm_added_q.weight, self.norm_q.weight, *rope, eps)
        k = norm_rope(k, text_len, self.norm_added_k.weight, self.norm_k.weight, *rope, eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, image, text, rope, attn_mask=None):
        q, k, v = self.prologue(image, text, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        text_len = text.shape[1]
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # `net.0.proj`, `net.2`: the official key names (net.1 is a dropout with no weights).
        self.net = nn.Sequential(GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


def modulate(x, params, index=None):
    """x: (B, S, d); params: (B, 3d) as shift, scale, gate -> (modulated x, gate (B|1, S|1, d)).

    With `index` (zero_cond_t), params is (2B, 3d): rows [:B] for tokens whose index is 0 (the noisy target,
    modulated with t) and rows [B:] for the others (edit images, modulated with t = 0).
    """
    if index is None:
        params = params[:, None]
    else:
        first, second = params.chunk(2, dim=0)
        params = torch.where(index[..., None] == 0, first[:, None], second[:, None])
    shift, scale, gate = params.chunk(3, dim=-1)
    return x * (1 + scale) + shift, gate


# Selective checkpointing (enable_gradient_checkpointing(keep_attention=True)): a checkpointed block keeps the output
# of its attention kernel, so the recompute in the backward pass skips attention's forward, the block's only op whose
# cost grows with the square of the tokens, for one hidden state of memory. These are the ops SDPA dispatches to on
# the CPU and CUDA (its math fallback, where no fused kernel applies, is plain ops and is recomputed as before).
# Inside a compiled block inductor calls them as external kernels, through the dispatcher, so torch's
# selective-checkpoint cache sees them there too (tests/test_compile.py checks both).
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(torch.ops.aten, name))


def save_attention_outputs(ctx, op, *args, **kwargs):
    """The selective-checkpoint policy: save attention's outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class QwenImageTransformerBlock(nn.Module):
    # For torch.compile (diffsynth/utils/compile.py): the dims of forward's tensors that follow the batch size and
    # the token counts, so that one compiled graph serves every aspect bucket and prompt length.
    dynamic_dims = {"image": (0, 1), "text": (0, 1), "temb": (0,), "rope": (0,), "attn_mask": (0, 3),
                    "modulate_index": (0, 1)}

    def __init__(self, dim, num_heads, head_dim, attention_cls=QwenImageAttention, eps=1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = LayerNorm(dim, eps)
        self.img_norm2 = LayerNorm(dim, eps)
        self.txt_norm1 = LayerNorm(dim, eps)
        self.txt_norm2 = LayerNorm(dim, eps)
        self.attn = attention_cls(dim, num_heads, head_dim, eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(self, image, text, temb, rope, attn_mask=None, modulate_index=None):
        # With zero_cond_t, temb is (2B, d): the image stream picks per token, the text stream uses t.
        img_attn_mod, img_mlp_mod = self.img_mod(temb).chunk(2, dim=-1)
        text_temb = temb if modulate_index is None else temb.chunk(2, dim=0)[0]
        txt_attn_mod, txt_mlp_mod = self.txt_mod(text_temb).chunk(2, dim=-1)

        img_in, img_gate = modulate(self.img_norm1(image), img_attn_mod, modulate_index)
        txt_in, txt_gate = modulate(self.txt_norm1(text), txt_attn_mod)
        img_out, txt_out = self.attn(img_in, txt_in, rope, attn_mask)
        image = image + img_gate * img_out
        text = text + txt_gate * txt_out

        img_in, img_gate = modulate(self.img_norm2(image), img_mlp_mod, modulate_index)
        image = image + img_gate * self.img_mlp(img_in)
        txt_in, txt_gate = modulate(self.txt_norm2(text), txt_mlp_mod)
        text = text + txt_gate * self.txt_mlp(txt_in)

        if image.dtype == torch.float16:  # fp16 overflows in the residual stream of the 20B model
            image, text = image.clip(-65504, 65504), text.clip(-65504, 65504)
        return image, text


class AdaLayerNormOut(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)  # scale first, then shift
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class QwenImageDiT(nn.Module):
    attention_cls = QwenImageAttention

    def __init__(
        self,
        num_layers=60,
        num_attention_heads=24,
        attention_head_dim=128,
        in_channels=64,
        out_channels=16,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
        patch_size=2,
        zero_cond_t=False,
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}")
        self.config = dict(
            num_layers=num_layers, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, joint_attention_dim=joint_attention_dim,
            axes_dims_rope=tuple(axes_dims_rope), patch_size=patch_size, zero_cond_t=zero_cond_t,
        )
        dim = num_attention_heads * attention_head_dim
        self.zero_cond_t = zero_cond_t
        self.pos_embed = QwenImageRoPE(axes_dims_rope)
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(joint_attention_dim)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([
            QwenImageTransformerBlock(dim, num_attention_heads, attention_head_dim, self.attention_cls)
            for _ in range(num_layers)
        ])
        self.norm_out = AdaLayerNormOut(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False
        self.gradient_checkpointing_offload = False
        self.checkpointed_blocks = num_layers  # the last this many blocks are checkpointed (when enabled)
        self.checkpoint_keep_attention = False  # selective checkpointing: see save_attention_outputs
        self.block_swap = None

    def unused_in_output(self):
        """Modules whose output never reaches the prediction: the last block's text stream after attention
        (only the image stream goes on to norm_out). They get no gradient, which DDP treats as an error."""
        last = f"transformer_blocks.{len(self.transformer_blocks) - 1}"
        return [f"{last}.attn.to_add_out", f"{last}.txt_mlp"]

    def enable_gradient_checkpointing(self, offload=False, blocks=None, keep_attention=False):
        """Recompute blocks in backward; with offload, the saved block inputs wait on the CPU. `blocks`: checkpoint
        only the last `blocks` blocks (default: all); the others keep their activations for the backward pass, so
        they are not run twice: faster, for the memory of their activations (a block swapped without checkpointing
        keeps its weights' device copy alive until its backward: swap only checkpointed blocks to save memory).
        `keep_attention`: the checkpointed blocks keep their attention outputs (on the device, offload or not), and
        the recompute skips attention's forward (selective checkpointing; the gradients are the same)."""
        n = len(self.transformer_blocks)
        blocks = n if blocks is None else blocks
        if not 0 < blocks <= n:
            raise ValueError(f"blocks_to_checkpoint {blocks}: the DiT has {n} blocks; checkpoint 1 to {n}")
        self.gradient_checkpointing, self.gradient_checkpointing_offload = True, offload
        self.checkpointed_blocks, self.checkpoint_keep_attention = blocks, keep_attention

    def enable_block_swap(self, num_blocks, device, prefetch=1):
        """Keep the frozen weights of the last `num_blocks` blocks in (pinned) host memory; each visits `device`
        only while its block runs (`block_swap.py`). Call it after LoRA injection and fp8 conversion; afterwards
        `.to(device)` moves only the resident part. 0 turns swapping off."""
        from .block_swap import BlockSwap

        self.disable_block_swap()
        if num_blocks:
            self.block_swap = BlockSwap(self, num_blocks, device, prefetch)

    def disable_block_swap(self):
        if self.block_swap is not None:
            self.block_swap.close()
            self.block_swap = None

    def _apply(self, fn, recurse=True):
        if self.block_swap is None:
            return super()._apply(fn, recurse)
        with self.block_swap.detached():  # swapped weights stay in host memory whatever .to() asks
            return super()._apply(fn, recurse)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes):
        batch, seq_len = hidden_states.shape[:2]
        if len(img_shapes) not in (1, batch):
            raise ValueError(f"img_shapes has {len(img_shapes)} entries for a batch of {batch}")
        shapes = [list(map(tuple, s)) for s in img_shapes]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(
                f"All samples of a batch must have the same img_shapes (got {shapes}); batch samples of one size "
                "together (aspect-ratio buckets) or run them one by one."
            )
        shapes = shapes[0]
        if sum(f * h * w for f, h, w in shapes) != seq_len:
            raise ValueError(f"img_shapes {shapes} describe {sum(f * h * w for f, h, w in shapes)} tokens, "
                             f"hidden_states has {seq_len}")

        image = self.img_in(hidden_states)
        text = self.txt_in(self.txt_norm(encoder_hidden_states))
        timestep = timestep.to(image.dtype)
        modulate_index = None
        if self.zero_cond_t:
            # Edit-2511: the target tokens see t, the edit-image tokens see t = 0.
            timestep = torch.cat([timestep, timestep * 0])
            target_len = math.prod(shapes[0])
            modulate_index = torch.ones(batch, seq_len, dtype=torch.int, device=image.device)
            modulate_index[:, :target_len] = 0
        temb = self.time_text_embed(timestep, image.dtype)

        # A mask keeps SDPA off its fastest kernels: build one only when some text is padded.
        attn_mask = None
        if encoder_hidden_states_mask is not None and not bool(encoder_hidden_states_mask.bool().all()):
            image_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=image.device)
            attn_mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask], dim=1)[:, None, None, :]

        rope = self.pos_embed(shapes, text.shape[1], image.device)
        first_checkpointed = len(self.transformer_blocks) - self.checkpointed_blocks
        for i, block in enumerate(self.transformer_blocks):
            # (a block whose compiled forward holds the checkpoint itself, utils/compile.py, is called as it is)
            checkpointed = (self.gradient_checkpointing and i >= first_checkpointed and torch.is_grad_enabled()
                            and not getattr(block, "checkpoints_in_graph", False))
            if self.block_swap is not None:
                block = self.block_swap.bind(i)  # the same call, with the block's weights on the device
            if checkpointed:
                image, text = self._checkpointed(block, image, text, temb, rope, attn_mask, modulate_index)
            else:
                image, text = block(image, text, temb, rope, attn_mask, modulate_index)

        if self.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return self.proj_out(self.norm_out(image, temb))

    def checkpoint_options(self) -> dict:
        """Keyword arguments of torch.utils.checkpoint.checkpoint for the checkpointed blocks."""
        if self.checkpoint_keep_attention:
            return {"use_reentrant": False,
                    "context_fn": functools.partial(create_selective_checkpoint_contexts, save_attention_outputs)}
        return {"use_reentrant": False}

    def checkpoint_in_graph(self):
        """For compile_blocks: the index of the first checkpointed block when the checkpoint may go inside the
        blocks' compiled graphs, else None: not with the offload (save_on_cpu would also move what the graph saves)
        or block swap (the graph would keep a swapped block's weights on the device until its backward)."""
        if not self.gradient_checkpointing or self.gradient_checkpointing_offload or self.block_swap is not None:
            return None
        return len(self.transformer_blocks) - self.checkpointed_blocks

    def _checkpointed(self, block, *args):
        run = lambda: torch.utils.checkpoint.checkpoint(block, *args, **self.checkpoint_options())  # noqa: E731
        if self.gradient_checkpointing_offload:
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return run()
        return run()
