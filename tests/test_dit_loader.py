"""Loading the official (diffusers) file layout strictly, in both QKV layouts, and full-checkpoint conversion."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_diffusers_dit
from diffsynth.models import load_qwen_image_dit, merge_qkv_state_dict
from diffsynth.models.dit_loader import convert_dit_checkpoint, parse_size
from diffsynth.utils.io import WeightFileError, resolve_safetensors_files
from test_dit import edit_batch


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A diffusers save_pretrained folder, sharded small enough that some q/k/v triples straddle two shards."""
    reference = random_diffusers_dit(zero_cond_t=True)
    folder = tmp_path_factory.mktemp("transformer")
    reference.save_pretrained(folder, max_shard_size="60KB")
    return reference, folder


def reference_output(reference):
    with torch.no_grad():
        x, text, mask, t, shapes = edit_batch()
        return reference(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                         timestep=t, img_shapes=shapes, return_dict=False)[0]


def test_fixture_splits_qkv_triples_over_shards(official):
    _, folder = official
    index = json.load(open(folder / "diffusion_pytorch_model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) > 3
    straddling = [b for b in range(2) for group in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
                  if len({index[f"transformer_blocks.{b}.attn.{p}.weight"] for p in group}) > 1]
    assert straddling, "make the shards smaller: the streaming merge path is not exercised"


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("how", ["dir", "index", "list"])
def test_load_official_layout(official, merged, how):
    reference, folder = official
    paths = {"dir": folder, "index": folder / "diffusion_pytorch_model.safetensors.index.json",
             "list": resolve_safetensors_files(folder)}[how]
    model = load_qwen_image_dit(paths, merged_qkv=merged)
    assert model.config["zero_cond_t"] is True and model.config["num_layers"] == 2
    assert model.config["axes_dims_rope"] == (8, 12, 12)
    assert hasattr(model.transformer_blocks[0].attn, "to_qkv") == merged
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        out = model(*edit_batch())
    torch.testing.assert_close(out, reference_output(reference), rtol=1e-5, atol=1e-6)


def test_load_dtype(official):
    model = load_qwen_image_dit(official[1], merged_qkv=True, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_strict_loading_lists_missing_and_unexpected_keys(official, tmp_path):
    reference, _ = official
    sd = merge_qkv_state_dict(reference.state_dict())
    del sd["transformer_blocks.1.img_mlp.net.2.bias"]
    sd["transformer_blocks.0.attn.something_else.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "dit.safetensors", metadata={"config": json.dumps({"axes_dims_rope": [8, 12, 12]})})
    with pytest.raises(WeightFileError) as e:
        load_qwen_image_dit(tmp_path / "dit.safetensors", merged_qkv=False)
    assert "missing keys ['transformer_blocks.1.img_mlp.net.2.bias']" in str(e.value)
    assert "transformer_blocks.0.attn.something_else.weight" in str(e.value)


def test_loader_errors(official, tmp_path):
    _, folder = official
    with pytest.raises(WeightFileError, match="file not found"):
        load_qwen_image_dit(tmp_path / "nope.safetensors", merged_qkv=True)
    with pytest.raises(WeightFileError, match="refused for safety"):
        load_qwen_image_dit(tmp_path / "model.bin", merged_qkv=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in os.listdir(folder):
        if not f.endswith("00002-of-" + f.split("-of-")[-1]) or not f.startswith("diffusion_pytorch_model-"):
            (partial / f).write_bytes((folder / f).read_bytes())
    with pytest.raises(WeightFileError, match="shards are missing: .*00002-of"):
        load_qwen_image_dit(partial, merged_qkv=True)
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(WeightFileError, match="not a Qwen-Image DiT"):
        load_qwen_image_dit(tmp_path / "vae.safetensors", merged_qkv=True)
    # no config anywhere and a head dim other than the real model's: say what to do
    sd = load_file(resolve_safetensors_files(folder)[0])
    full = {}
    for f in resolve_safetensors_files(folder):
        full.update(load_file(f))
    save_file(full, tmp_path / "noconfig.safetensors")
    with pytest.raises(WeightFileError, match="put the model's config.json beside the weights"):
        load_qwen_image_dit(tmp_path / "noconfig.safetensors", merged_qkv=True)
    assert sd


def test_convert_round_trip_bit_exact(official, tmp_path):
    reference, folder = official
    original = {}
    for f in resolve_safetensors_files(folder):
        original.update(load_file(f))

    merged_file = tmp_path / "merged.safetensors"
    assert convert_dit_checkpoint(folder, merged_file, "to_merged") == [str(merged_file)]
    merged = load_file(merged_file)
    assert "transformer_blocks.0.attn.to_qkv.weight" in merged

    # merged single file -> standard shards in a directory (diffusers names, index json)
    out_dir = tmp_path / "standard"
    written = convert_dit_checkpoint(merged_file, out_dir, "to_standard", max_shard_size="40KB")
    index = json.load(open(out_dir / "diffusion_pytorch_model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(out_dir / s) for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    assert len(written) == len(shards) + 1
    back = {}
    for f in resolve_safetensors_files(out_dir):
        back.update(load_file(f))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert not [f for f in os.listdir(out_dir) if f.startswith(".tmp")]

    # sharded merged output next to a .safetensors name, and the merged shards load as a model
    written = convert_dit_checkpoint(out_dir, tmp_path / "m.safetensors", "to_merged", max_shard_size="50KB")
    assert os.path.basename(written[-1]) == "m.safetensors.index.json"
    model = load_qwen_image_dit(written[-1], merged_qkv=True)
    with torch.no_grad():
        torch.testing.assert_close(model(*edit_batch()), reference_output(reference), rtol=1e-5, atol=1e-6)


def test_convert_refuses_wrong_direction_and_leaves_no_file(official, tmp_path):
    _, folder = official
    with pytest.raises(WeightFileError, match="already in the standard layout; use --direction to_merged"):
        convert_dit_checkpoint(folder, tmp_path / "x.safetensors", "to_standard")
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_failure_midway_leaves_no_partial_output(official, tmp_path, monkeypatch):
    import diffsynth.utils.io as io

    _, folder = official
    real, calls = io.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", failing)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_dit_checkpoint(folder, out_dir, "to_merged", max_shard_size="40KB")
    assert os.listdir(out_dir) == []
    # a single file is streamed shard by shard: a failure after the first input shard leaves nothing behind
    import diffsynth.models.dit_loader as loader

    real_load, loads = loader.load_safetensors, []

    def failing_load(file, device="cpu"):
        loads.append(file)
        if len(loads) == 2:
            raise OSError("disk full")
        return real_load(file, device=device)

    monkeypatch.setattr(loader, "load_safetensors", failing_load)
    with pytest.raises(OSError, match="disk full"):
        convert_dit_checkpoint(folder, tmp_path / "single.safetensors", "to_merged")
    assert os.listdir(tmp_path) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size(123) == 123
    assert parse_size("1GiB") == 2**30
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_streaming_safetensors_writer(tmp_path):
    from safetensors import safe_open

    from diffsynth.utils.io import save_safetensors_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a.bias": torch.randn(7, generator=g),
               "c.scale": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn), "d.step": torch.tensor(3)}
    plan = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    # chunks in another order than the plan: each tensor lands at its planned offset
    chunks = [{"c.scale": tensors["c.scale"], "d.step": tensors["d.step"]},
              {"a.bias": tensors["a.bias"], "b.weight": tensors["b.weight"]}]
    save_safetensors_streaming(tmp_path / "x.safetensors", plan, iter(chunks), {"qkv_layout": "merged_qkv"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in tensors.items() if v.ndim) and back["d.step"].item() == 3
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"qkv_layout": "merged_qkv"}
    with pytest.raises(ValueError, match="1 planned tensors never came: d.step"):
        save_safetensors_streaming(tmp_path / "y.safetensors", plan, iter(chunks[1:] + [{"c.scale": tensors["c.scale"]}]))
    with pytest.raises(ValueError, match="streamed tensor a.bias .* does not match the plan"):
        save_safetensors_streaming(tmp_path / "y.safetensors", plan, iter([{"a.bias": torch.zeros(8)}]))
    assert not (tmp_path / "y.safetensors").exists() and sorted(os.listdir(tmp_path)) == ["x.safetensors"]
