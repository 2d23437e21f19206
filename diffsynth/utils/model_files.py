"""Finding model files: `model_id:pattern` entries under a models directory, downloaded with modelscope when
missing; `--model_paths` lists; recognising a file set by its keys.

Layout: `<models_dir>/<model_id>/<pattern>`, e.g. `./models/Qwen/Qwen-Image-Edit/transformer/...`, the same
paths ModelScope and Hugging Face repos use. Files already there are used without any network call.
"""
import glob
import json
import os
import re

from diffsynth.utils.io import WeightFileError, read_keys_and_shapes, resolve_safetensors_files

DEFAULT_MODELS_DIR = "./models"
MODELS_DIR_ENV = "DIFFSYNTH_MODELS_DIR"


def get_models_dir(models_dir=None) -> str:
    """The flag beats the DIFFSYNTH_MODELS_DIR environment variable, which beats ./models."""
    return models_dir or os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR


def _split_entry(entry: str) -> tuple[str, str]:
    model_id, sep, pattern = entry.strip().partition(":")
    if not sep or not model_id or not pattern or model_id.count("/") != 1:
        raise ValueError(
            f"bad model entry {entry!r}: expected 'org/model:path/pattern', "
            "e.g. 'Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors'"
        )
    return model_id, pattern


def _download(model_id: str, local_dir: str, allow_patterns: list[str]):
    """Fetch the files matching allow_patterns into local_dir; returns the error text, or None on success."""
    try:
        import modelscope  # looked up at call time: imported lazily and patchable in tests

        modelscope.snapshot_download(model_id, local_dir=local_dir, allow_patterns=allow_patterns)
        return None
    except Exception as e:  # network, authentication, unknown repo: all reported with the expected paths
        return f"{type(e).__name__}: {e}"


def _missing_shards(path_pattern: str) -> list[str]:
    """Shards named by an index json that matches `<pattern>.index.json` but are not on disk."""
    missing = []
    for index in sorted(glob.glob(path_pattern + ".index.json")):
        try:
            with open(index) as f:
                shards = dict.fromkeys(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise WeightFileError(f"{index}: unreadable safetensors index ({e}); delete it and download again") from e
        base = os.path.dirname(index)
        missing += [os.path.join(base, s) for s in shards if not os.path.isfile(os.path.join(base, s))]
    return missing


def _find(path_pattern: str):
    files = sorted(f for f in glob.glob(path_pattern) if os.path.isfile(f))
    return files, _missing_shards(path_pattern)


def resolve_model_files(model_id_with_origin_paths: str, models_dir=None, download: bool = True) -> list[list[str]]:
    """'id:pattern,id:pattern,...' -> one sorted list of local files per entry, downloading what is missing.

    A sharded set (an index json beside the files) counts as present only when every shard it names is there.
    """
    models_dir = get_models_dir(models_dir)
    entries = [e for e in model_id_with_origin_paths.split(",") if e.strip()]
    if not entries:
        raise ValueError("--model_id_with_origin_paths is empty; give entries like 'Qwen/Qwen-Image:vae/*.safetensors'")
    results = []
    for entry in entries:
        model_id, pattern = _split_entry(entry)
        local_dir = os.path.join(models_dir, model_id)
        path_pattern = os.path.join(local_dir, pattern)
        files, missing = _find(path_pattern)
        error = None
        if (not files or missing) and download:
            # Configs (and the shard index) live beside the weights; fetch them with them.
            config_pattern = os.path.join(os.path.dirname(pattern), "*.json")
            error = _download(model_id, local_dir, [pattern, config_pattern])
            files, missing = _find(path_pattern)
        why = f"download failed ({error})" if error else ("downloads are disabled" if not download else None)
        if missing:
            raise WeightFileError(
                f"{entry}: incomplete sharded file set, {len(missing)} shard(s) missing: {', '.join(missing)}"
                + (f"; {why}" if why else "")
                + f". Download the complete set into {os.path.dirname(path_pattern)}."
            )
        if not files:
            raise WeightFileError(
                f"{entry}: no file matches {path_pattern}"
                + (f"; {why}" if why else "; the download finished but brought no matching file")
                + f". Put the files there, set --models_dir or {MODELS_DIR_ENV}, or pass --model_paths."
            )
        results.append(files)
    return results


def resolve_model_dir(model_id_with_subdir: str, models_dir=None, download: bool = True) -> str:
    """'Qwen/Qwen-Image:tokenizer/' -> '<models_dir>/Qwen/Qwen-Image/tokenizer', downloaded when absent or empty."""
    models_dir = get_models_dir(models_dir)
    model_id, subdir = _split_entry(model_id_with_subdir)
    subdir = subdir.strip("/")
    local_dir = os.path.join(models_dir, model_id)
    path = os.path.join(local_dir, subdir)

    def present():
        return os.path.isdir(path) and any(os.scandir(path))

    error = None
    if not present() and download:
        error = _download(model_id, local_dir, [f"{subdir}/*"])
    if not present():
        why = f"download failed ({error})" if error else ("downloads are disabled" if not download else "")
        raise WeightFileError(
            f"{model_id_with_subdir}: directory {path} is missing or empty"
            + (f"; {why}" if why else "; the download brought no file")
            + ". Put the files there, set --models_dir, or pass the directory explicitly "
            "(--tokenizer_path / --processor_path)."
        )
    return path


def parse_model_paths(json_str: str) -> list:
    """--model_paths: a JSON list whose items are a path or a list of paths (one model's shards).

    Every path must exist (files or directories); all missing ones are listed at once.
    """
    example = '\'["dit.safetensors", ["te-00001.safetensors", "te-00002.safetensors"], "vae.safetensors"]\''
    try:
        items = json.loads(json_str)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model_paths is not valid JSON ({e}); expected e.g. {example}") from e
    if not isinstance(items, list) or not items:
        raise ValueError(f"--model_paths must be a non-empty JSON list, got {json_str!r}; e.g. {example}")
    missing = []
    for item in items:
        paths = item if isinstance(item, list) else [item]
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"--model_paths item {item!r} must be a path string or a non-empty list of them")
        missing += [p for p in paths if not os.path.exists(p)]
    if missing:
        raise WeightFileError(f"--model_paths: {len(missing)} path(s) not found: {', '.join(missing)}")
    return items


# Key patterns that identify each kind of file set (any shard of the set suffices).
_DIT_MERGED = re.compile(r"^transformer_blocks\.\d+\.attn\.(to_qkv|add_qkv_proj)\.")
_DIT = re.compile(r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.")
_TEXT_ENCODER = re.compile(r"^(model\.layers\.|model\.embed_tokens\.|model\.language_model\.|model\.visual\.|visual\.)")
_VAE = re.compile(r"^(encoder\.conv_in\.|decoder\.conv_in\.|post_quant_conv\.)")


def detect_model_kind(files) -> str:
    """'dit' | 'dit_merged_qkv' | 'text_encoder' | 'vae', from the tensor names in the headers only."""
    files = resolve_safetensors_files(files)
    keys = list(read_keys_and_shapes(files))
    where = ", ".join(files)
    if any(".lora_" in k or k.endswith((".alpha", ".diff", ".diff_b")) for k in keys):
        raise WeightFileError(f"{where}: this is a LoRA file, not a base model; pass it with --lora_path / --lora_checkpoint")
    kinds = [
        kind
        for kind, pattern in (("dit_merged_qkv", _DIT_MERGED), ("dit", _DIT), ("text_encoder", _TEXT_ENCODER), ("vae", _VAE))
        if any(pattern.match(k) for k in keys)
    ]
    if len(kinds) == 1:
        return kinds[0]
    if not kinds and any(k.startswith(("transformer_blocks.", "img_in.", "proj_out.")) for k in keys):
        raise WeightFileError(
            f"{where}: part of a DiT without any attention projection, so standard and merged-QKV cannot be told "
            "apart; pass all the shards of the set (or its directory / index json)"
        )
    if not kinds:
        raise WeightFileError(
            f"{where}: not a Qwen-Image model file set (none of DiT, merged-QKV DiT, text encoder, VAE); "
            f"its first keys: {', '.join(keys[:5]) or '(none)'}. Expected keys like "
            "'transformer_blocks.0.attn.to_q.weight', 'transformer_blocks.0.attn.to_qkv.weight', "
            "'model.layers.0.self_attn.q_proj.weight' or 'encoder.conv_in.weight'."
        )
    raise WeightFileError(f"{where}: keys of several models mixed in one file set ({', '.join(kinds)}); pass each model's files separately")
