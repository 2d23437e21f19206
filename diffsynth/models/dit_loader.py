"""Load a Qwen-Image DiT from the official file layout (or ours), in either QKV layout, shard by shard."""
import glob
import json
import os
import re

import torch

from ..utils.io import (
    WeightFileError, check_not_input, load_safetensors, loading, read_keys_and_shapes, read_meta_tensors, read_metadata,
    resolve_safetensors_files,
)
from .qwen_image_dit import QwenImageDiT
from .qwen_image_dit_merged_qkv import (
    QwenImageDiTMergedQKV, is_qkv_key, merge_qkv_state_dict, pending_qkv_keys, split_qkv_state_dict,
)


def dit_layout(keys) -> str:
    """'standard' or 'merged_qkv' from the key names; anything else is an error."""
    keys = list(keys)
    if any(k.endswith("attn.to_qkv.weight") for k in keys):
        return "merged_qkv"
    if any(k.endswith("attn.to_q.weight") for k in keys):
        return "standard"
    raise WeightFileError("not a Qwen-Image DiT: no transformer_blocks.N.attn.to_q / to_qkv weights among "
                          f"{len(keys)} keys (first: {', '.join(sorted(keys)[:5])})")


def _config_json(files) -> dict:
    path = os.path.join(os.path.dirname(files[0]), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    meta = read_metadata(files[0]).get("config")
    return json.loads(meta) if meta else {}


def infer_dit_config(files) -> dict:
    """Config from tensor shapes; rope axes, patch size and zero_cond_t from the config json when present."""
    shapes = read_keys_and_shapes(files)
    dit_layout(shapes)
    saved = _config_json(files)
    for flag in ("use_additional_t_cond", "use_layer3d_rope"):
        if saved.get(flag):
            raise WeightFileError(f"{files[0]}: config sets {flag}=true (Qwen-Image-Layered); only Qwen-Image / "
                                  "Qwen-Image-Edit DiTs are supported")
    dim, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    patch_size = saved.get("patch_size", 2)
    config = dict(
        num_layers=1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))),
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] // patch_size**2,
        joint_attention_dim=shapes["txt_in.weight"][1],
        patch_size=patch_size,
        zero_cond_t=bool(saved.get("zero_cond_t", False)),
    )
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "joint_attention_dim"):
        if key in saved and saved[key] != config[key]:
            raise WeightFileError(f"{files[0]}: config json says {key}={saved[key]} but the weights have {config[key]}")
    if "axes_dims_rope" in saved:
        config["axes_dims_rope"] = tuple(saved["axes_dims_rope"])
    elif head_dim == 128:
        config["axes_dims_rope"] = (16, 56, 56)
    else:
        raise WeightFileError(f"{files[0]}: cannot infer the RoPE axes for head dim {head_dim}; put the model's "
                              "config.json beside the weights")
    return config


def iter_dit_state_dict(files, merged_qkv: bool, torch_dtype=None, device="cpu", progress=None):
    """Yield the checkpoint converted to the wanted layout, one shard at a time.

    A q/k/v triple split over two shards is held back until complete, so peak memory stays near one shard.
    device="meta" reads only the headers: the same chunks as meta tensors, to plan a file before writing it.
    `progress`: a description for a progress bar over the bytes read (None: no bar).
    """
    convert = merge_qkv_state_dict if merged_qkv else split_qkv_state_dict
    source_layout = dit_layout(read_keys_and_shapes(files))
    needs_conversion = source_layout != ("merged_qkv" if merged_qkv else "standard")
    pending = {}
    for file in loading(files, progress, enabled=progress is not None):
        tensors = read_meta_tensors(file) if str(device) == "meta" else load_safetensors(file, device=device)
        chunk = {**pending, **tensors}
        if torch_dtype is not None:
            chunk = {k: v.to(torch_dtype) for k, v in chunk.items()}
        held = pending_qkv_keys(chunk) if needs_conversion and merged_qkv else set()
        pending = {k: chunk.pop(k) for k in held}
        if needs_conversion and any(is_qkv_key(k) for k in chunk):
            chunk = convert(chunk)
        yield chunk
    if pending:
        raise WeightFileError("incomplete q/k/v triples in the checkpoint: " + ", ".join(sorted(pending)))


def load_qwen_image_dit(paths, merged_qkv: bool, torch_dtype=torch.float32, device="cpu", progress=True):
    """One file, a list, a directory or an index json, in either layout -> QwenImageDiT(MergedQKV), strictly loaded.

    The model is built on the meta device and each converted shard is assigned in place: no second copy.
    """
    files = resolve_safetensors_files(paths)
    config = infer_dit_config(files)
    cls = QwenImageDiTMergedQKV if merged_qkv else QwenImageDiT
    with torch.device("meta"):
        model = cls(**config)
    expected = set(model.state_dict())
    loaded, unexpected = set(), []
    for chunk in iter_dit_state_dict(files, merged_qkv, torch_dtype, device, "loading DiT" if progress else None):
        unexpected += [k for k in chunk if k not in expected]
        chunk = {k: v for k, v in chunk.items() if k in expected}
        model.load_state_dict(chunk, strict=False, assign=True)
        loaded.update(chunk)
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise WeightFileError(
            f"DiT weights in {files[0]}{' (and %d more files)' % (len(files) - 1) if len(files) > 1 else ''} do not "
            f"match {cls.__name__}{config}: missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    return model.eval()


def parse_size(size) -> int:
    """'5GB', '500MB', '10KB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or a byte count")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * unit)


def convert_dit_checkpoint(input_paths, output, direction: str, max_shard_size=None) -> list[str]:
    """Convert a full DiT checkpoint between the standard and merged-QKV layouts; returns the files written.

    `output` ending in `.safetensors` with no `max_shard_size` -> one file; otherwise shards of at most
    `max_shard_size` (default 5GB) plus an index json. Either way the checkpoint is converted and written one
    input shard at a time (a single file is planned from the headers first, then streamed), so peak memory stays
    near one input shard plus, for shards, one output shard. For a directory output the shards take the diffusers
    names (`diffusion_pytorch_model-0000i-of-0000N.safetensors`) and config.json is copied.
    Every file is written to a temporary name first and renamed into place only when all were written.
    """
    import shutil
    import tempfile

    from ..utils.io import save_safetensors, save_safetensors_streaming, write_json_atomic

    if direction not in ("to_merged", "to_standard"):
        raise ValueError(f"--direction must be to_merged or to_standard, not {direction!r}")
    files = resolve_safetensors_files(input_paths)
    output = os.fspath(output)
    single = output.endswith(".safetensors") and max_shard_size is None
    index_files = [os.fspath(p) for p in ([input_paths] if isinstance(input_paths, (str, os.PathLike)) else input_paths)
                   if os.fspath(p).endswith(".json")]
    index_files += glob.glob(os.path.join(glob.escape(os.path.dirname(files[0])), "*.safetensors.index.json"))
    check_not_input(output, files + index_files, folder_output=not single)
    config = infer_dit_config(files)
    merged = direction == "to_merged"
    layout = "merged_qkv" if merged else "standard"
    if dit_layout(read_keys_and_shapes(files)) == layout:
        raise WeightFileError(f"{files[0]}: checkpoint is already in the {layout} layout; "
                              f"use --direction {'to_standard' if merged else 'to_merged'} to convert it the other way")
    metadata = {"format": "pt", "qkv_layout": layout, "config": json.dumps(config)}
    if single:
        plan = {}
        for chunk in iter_dit_state_dict(files, merged, device="meta"):
            plan.update(chunk)
        save_safetensors_streaming(output, plan, iter_dit_state_dict(files, merged, progress="converting"), metadata)
        return [output]

    limit = parse_size(max_shard_size or "5GB")
    if output.endswith(".safetensors"):
        out_dir, stem = os.path.dirname(os.path.abspath(output)), os.path.basename(output)[: -len(".safetensors")]
    else:
        out_dir, stem = output, "diffusion_pytorch_model"
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-convert-", dir=out_dir)
    try:
        shards, buffer, size, total = [], {}, 0, 0

        def flush():
            nonlocal buffer, size
            if buffer:
                name = f"part-{len(shards):05d}.safetensors"
                save_safetensors(buffer, os.path.join(tmp_dir, name), metadata)
                shards.append((name, list(buffer)))
                buffer, size = {}, 0

        for chunk in iter_dit_state_dict(files, merged, progress="converting"):
            for key, tensor in chunk.items():
                nbytes = tensor.numel() * tensor.element_size()
                if buffer and size + nbytes > limit:
                    flush()
                buffer[key], size, total = tensor, size + nbytes, total + nbytes
            del chunk
        flush()
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {key: name for name, (_, keys) in zip(names, shards) for key in keys}
        written = []
        for name, (tmp_name, _) in zip(names, shards):
            os.replace(os.path.join(tmp_dir, tmp_name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
        index = os.path.join(out_dir, f"{stem}.safetensors.index.json")
        write_json_atomic({"metadata": {"total_size": total, "qkv_layout": layout}, "weight_map": weight_map}, index)
        written.append(index)
        source_config = os.path.join(os.path.dirname(files[0]), "config.json")
        if not output.endswith(".safetensors") and os.path.isfile(source_config):
            shutil.copyfile(source_config, os.path.join(out_dir, "config.json"))
            written.append(os.path.join(out_dir, "config.json"))
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
