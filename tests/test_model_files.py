import json
import os

import modelscope
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.utils.io import WeightFileError
from diffsynth.utils.model_files import (
    detect_model_kind, parse_model_paths, resolve_model_dir, resolve_model_files,
)

DIT = "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors"
VAE = "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors"


def write(path, keys):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return str(path)


def write_sharded_dit(root, shards=(1, 2, 3), total=3):
    """Official layout: transformer/diffusion_pytorch_model-0000i-of-0000N.safetensors + index json."""
    d = root / "Qwen" / "Qwen-Image-Edit" / "transformer"
    names = [f"diffusion_pytorch_model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    weight_map = {}
    for i, name in enumerate(names, 1):
        keys = [f"transformer_blocks.{i}.attn.to_q.weight", f"transformer_blocks.{i}.img_mlp.net.2.weight"]
        weight_map.update({k: name for k in keys})
        if i in shards:
            write(d / name, keys)
    os.makedirs(d, exist_ok=True)
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text("{}")
    return d, [str(d / n) for n in names]


def test_local_files_are_used_without_network(tmp_path, offline):
    _, shards = write_sharded_dit(tmp_path)
    vae = write(tmp_path / "Qwen/Qwen-Image/vae/diffusion_pytorch_model.safetensors", ["encoder.conv_in.weight"])
    files = resolve_model_files(f"{DIT}, {VAE}", models_dir=str(tmp_path))
    assert files == [shards, [vae]]
    assert offline == []


def test_models_dir_env_and_flag_precedence(tmp_path, offline, monkeypatch):
    _, shards = write_sharded_dit(tmp_path / "real")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DIFFSYNTH_MODELS_DIR", str(tmp_path / "real"))
    assert resolve_model_files(DIT) == [shards]  # env beats the default
    monkeypatch.setenv("DIFFSYNTH_MODELS_DIR", str(empty))
    assert resolve_model_files(DIT, models_dir=str(tmp_path / "real")) == [shards]  # flag beats env
    assert offline == []


def test_default_models_dir_is_dot_models(tmp_path, offline, monkeypatch):
    write_sharded_dit(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    files = resolve_model_files(DIT)[0]
    assert files[0] == "./models/Qwen/Qwen-Image-Edit/transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    assert offline == []


def test_missing_files_and_failed_download_name_the_expected_path(tmp_path, offline):
    with pytest.raises(WeightFileError) as e:
        resolve_model_files(VAE, models_dir=str(tmp_path))
    msg = str(e.value)
    assert f"no file matches {tmp_path}/Qwen/Qwen-Image/vae/diffusion_pytorch_model.safetensors" in msg
    assert "download failed (ConnectionError: cannot reach modelscope.cn for Qwen/Qwen-Image)" in msg
    # the download asked for the weights and the configs beside them, into the layout's directory
    assert offline == [
        ("Qwen/Qwen-Image", dict(local_dir=f"{tmp_path}/Qwen/Qwen-Image",
                                 allow_patterns=["vae/diffusion_pytorch_model.safetensors", "vae/*.json"]))
    ]


def test_download_disabled(tmp_path, offline):
    with pytest.raises(WeightFileError, match="downloads are disabled"):
        resolve_model_files(DIT, models_dir=str(tmp_path), download=False)
    assert offline == []


def test_download_fills_the_layout(tmp_path, monkeypatch):
    calls = []

    def fake_download(model_id, local_dir, allow_patterns):  # stands in for the network only
        calls.append(allow_patterns)
        write_sharded_dit(tmp_path)

    monkeypatch.setattr(modelscope, "snapshot_download", fake_download)
    files = resolve_model_files(DIT, models_dir=str(tmp_path))
    assert calls == [["transformer/diffusion_pytorch_model*.safetensors", "transformer/*.json"]]
    assert len(files[0]) == 3 and all(os.path.isfile(f) for f in files[0])


def test_partial_shard_set_names_missing_shards(tmp_path, offline):
    _, names = write_sharded_dit(tmp_path, shards=(1, 3))
    with pytest.raises(WeightFileError) as e:
        resolve_model_files(DIT, models_dir=str(tmp_path), download=False)
    msg = str(e.value)
    assert f"1 shard(s) missing: {names[1]}" in msg and "downloads are disabled" in msg
    # with downloads on, a partial set is fetched again; the failure is reported with the missing shard
    with pytest.raises(WeightFileError) as e:
        resolve_model_files(DIT, models_dir=str(tmp_path))
    assert names[1] in str(e.value) and "ConnectionError" in str(e.value)
    assert len(offline) == 1


def test_bad_entry_format(tmp_path, offline):
    for bad in ["Qwen/Qwen-Image", "Qwen-Image:vae/x.safetensors", ":vae/x.safetensors", " , "]:
        with pytest.raises(ValueError, match="model"):
            resolve_model_files(bad, models_dir=str(tmp_path))


def test_resolve_model_dir(tmp_path, offline, monkeypatch):
    with pytest.raises(WeightFileError) as e:
        resolve_model_dir("Qwen/Qwen-Image:tokenizer/", models_dir=str(tmp_path))
    assert f"{tmp_path}/Qwen/Qwen-Image/tokenizer is missing or empty" in str(e.value)
    assert "ConnectionError" in str(e.value) and "--tokenizer_path" in str(e.value)
    assert offline[0][1]["allow_patterns"] == ["tokenizer/*"]
    (tmp_path / "Qwen/Qwen-Image-Edit/processor").mkdir(parents=True)
    (tmp_path / "Qwen/Qwen-Image-Edit/processor/preprocessor_config.json").write_text("{}")
    path = resolve_model_dir("Qwen/Qwen-Image-Edit:processor/", models_dir=str(tmp_path))
    assert path == f"{tmp_path}/Qwen/Qwen-Image-Edit/processor"
    assert len(offline) == 1  # the present directory made no call


def test_parse_model_paths(tmp_path):
    a = write(tmp_path / "a.safetensors", ["x"])
    b = write(tmp_path / "b.safetensors", ["y"])
    assert parse_model_paths(json.dumps([a, [a, b]])) == [a, [a, b]]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_model_paths("[a.safetensors]")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        parse_model_paths(json.dumps(a))
    with pytest.raises(ValueError, match="path string"):
        parse_model_paths(json.dumps([a, 3]))
    with pytest.raises(WeightFileError, match=f"2 path\\(s\\) not found: {tmp_path}/c.safetensors, {tmp_path}/d"):
        parse_model_paths(json.dumps([a, [f"{tmp_path}/c.safetensors", f"{tmp_path}/d"]]))


def test_detect_model_kind(tmp_path):
    from diffusers import AutoencoderKLQwenImage

    dit = write(tmp_path / "dit.safetensors", ["img_in.weight", "transformer_blocks.0.attn.to_q.weight"])
    merged = write(tmp_path / "merged.safetensors", ["img_in.weight", "transformer_blocks.0.attn.to_qkv.weight"])
    te_official = write(tmp_path / "te1.safetensors", ["model.layers.0.self_attn.q_proj.weight", "visual.patch_embed.proj.weight", "lm_head.weight"])
    te_new = write(tmp_path / "te2.safetensors", ["model.language_model.layers.0.mlp.up_proj.weight", "model.visual.merger.mlp.0.weight"])
    vae_keys = AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1).state_dict().keys()
    vae = write(tmp_path / "vae.safetensors", vae_keys)
    assert detect_model_kind(dit) == "dit"
    assert detect_model_kind([merged]) == "dit_merged_qkv"
    assert detect_model_kind(te_official) == "text_encoder"
    assert detect_model_kind(te_new) == "text_encoder"
    assert detect_model_kind(vae) == "vae"


def test_detect_model_kind_sharded_set(tmp_path):
    d, names = write_sharded_dit(tmp_path)
    assert detect_model_kind(str(d)) == "dit"  # a directory with an index json
    assert detect_model_kind(names) == "dit"
    tail = write(tmp_path / "tail.safetensors", ["norm_out.linear.weight", "proj_out.weight"])
    with pytest.raises(WeightFileError, match="pass all the shards"):
        detect_model_kind(tail)


def test_detect_model_kind_errors(tmp_path):
    unknown = write(tmp_path / "clip.safetensors", ["text_model.embeddings.weight", "text_model.final_layer_norm.weight"])
    with pytest.raises(WeightFileError) as e:
        detect_model_kind(unknown)
    assert unknown in str(e.value) and "text_model.embeddings.weight" in str(e.value)
    lora = write(tmp_path / "lora.safetensors", ["transformer_blocks.0.attn.to_q.lora_A.default.weight"])
    with pytest.raises(WeightFileError, match="LoRA file"):
        detect_model_kind(lora)
    mixed = write(tmp_path / "mixed.safetensors", ["transformer_blocks.0.attn.to_q.weight", "encoder.conv_in.weight"])
    with pytest.raises(WeightFileError, match="several models mixed"):
        detect_model_kind(mixed)
