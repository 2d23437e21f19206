"""Qwen-Image DiT with merged attention projections: to_q/to_k/to_v -> to_qkv, add_q/k/v_proj -> add_qkv_proj.

`to_qkv` is Linear(d, 3d) whose weight is cat([Wq, Wk, Wv]) and bias cat([bq, bk, bv]); its output splits into
q, k, v in that order. The model is numerically the standard one: only the attention's projections differ, so
this file holds just that difference and the two pure state-dict conversions.
"""
import re

import torch
import torch.nn as nn

from .qwen_image_dit import QwenImageAttention, QwenImageDiT, norm_rope

# fused module name -> its three standard parts, in q, k, v order
QKV_GROUPS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
_PART_TO_FUSED = {part: (fused, i) for fused, parts in QKV_GROUPS.items() for i, part in enumerate(parts)}
_STANDARD_KEY = re.compile(r"^(.*\.)?attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.(weight|bias)$")
_MERGED_KEY = re.compile(r"^(.*\.)?attn\.(to_qkv|add_qkv_proj)\.(weight|bias)$")


class MergedQKVAttention(QwenImageAttention):
    def _make_qkv(self, dim):
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.add_qkv_proj = nn.Linear(dim, 3 * dim)

    def prologue(self, image, text, rope):
        # One copy joins the two streams' projections; q, k and v are views of it, and q and k are normalised
        # and rotated together in one pass (the standard layout needs three joins and two passes).
        qkv = torch.cat([self.add_qkv_proj(text), self.to_qkv(image)], dim=1)
        # split/unbind/squeeze rather than indexing: in eager backward an index's gradient is a zero tensor of the
        # whole input with the slice copied in, then summed; these views' gradients are one cat / stack.
        qk, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).split([2, 1], dim=2)
        text_weight = torch.stack([self.norm_added_q.weight, self.norm_added_k.weight])[:, None]
        image_weight = torch.stack([self.norm_q.weight, self.norm_k.weight])[:, None]
        q, k = norm_rope(qk, text.shape[1], text_weight, image_weight, *rope, self.norm_q.eps).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)


class QwenImageDiTMergedQKV(QwenImageDiT):
    attention_cls = MergedQKVAttention


class QKVLayoutError(ValueError):
    """A state dict that is not in the layout a conversion expects."""


def merge_qkv_state_dict(state_dict: dict) -> dict:
    """Standard layout -> merged layout. Every q/k/v triple must be complete and of one shape."""
    if any(_MERGED_KEY.match(k) for k in state_dict):
        raise QKVLayoutError("state dict is already in the merged-QKV layout (has to_qkv / add_qkv_proj keys); "
                             "use --direction to_standard to go the other way")
    groups, out = {}, {}
    for key, value in state_dict.items():
        m = _STANDARD_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, part, param = m.group(1) or "", m.group(2), m.group(3)
        fused, slot = _PART_TO_FUSED[part]
        groups.setdefault((prefix, fused, param), [None, None, None])[slot] = (key, value)
    if not groups:
        raise QKVLayoutError("state dict has no attention q/k/v projections (to_q, add_q_proj, ...): "
                             "not a standard-layout Qwen-Image DiT")
    for (prefix, fused, param), parts in groups.items():
        if any(p is None for p in parts):
            names = [f"{prefix}attn.{n}.{param}" for n, p in zip(QKV_GROUPS[fused], parts) if p is None]
            raise QKVLayoutError(f"cannot merge {prefix}attn.{fused}.{param}: missing {', '.join(names)}")
        shapes = {tuple(v.shape) for _, v in parts}
        if len(shapes) != 1:
            raise QKVLayoutError(f"cannot merge {prefix}attn.{fused}.{param}: q/k/v shapes differ "
                                 + ", ".join(f"{k}={tuple(v.shape)}" for k, v in parts))
        out[f"{prefix}attn.{fused}.{param}"] = torch.cat([v for _, v in parts], dim=0)
    return out


def split_qkv_state_dict(state_dict: dict) -> dict:
    """Merged layout -> standard layout (row thirds of each fused weight and bias)."""
    if any(_STANDARD_KEY.match(k) for k in state_dict):
        raise QKVLayoutError("state dict is already in the standard layout (has to_q / add_q_proj keys); "
                             "use --direction to_merged to go the other way")
    out, found = {}, False
    for key, value in state_dict.items():
        m = _MERGED_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        found = True
        prefix, fused, param = m.group(1) or "", m.group(2), m.group(3)
        if value.shape[0] % 3:
            raise QKVLayoutError(f"cannot split {key}: first dimension {value.shape[0]} is not a multiple of 3")
        for part, chunk in zip(QKV_GROUPS[fused], value.chunk(3, dim=0)):
            out[f"{prefix}attn.{part}.{param}"] = chunk.clone()  # a view would keep the whole fused tensor alive
    if not found:
        raise QKVLayoutError("state dict has no to_qkv / add_qkv_proj keys: not a merged-QKV Qwen-Image DiT")
    return out


def is_qkv_key(key) -> bool:
    """A q/k/v projection weight or bias of either layout."""
    return bool(_STANDARD_KEY.match(key) or _MERGED_KEY.match(key))


def pending_qkv_keys(keys) -> set:
    """Keys of incomplete q/k/v triples: a sharded checkpoint may put a block's q in one shard and its v in the
    next, so the streaming loader holds these back until the rest arrives."""
    seen = {}
    for key in keys:
        m = _STANDARD_KEY.match(key)
        if m:
            seen.setdefault((m.group(1), _PART_TO_FUSED[m.group(2)][0], m.group(3)), []).append(key)
    return {k for group in seen.values() if len(group) < 3 for k in group}
