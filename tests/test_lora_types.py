"""Issue 12: --lora_type loha|lokr|dora (peft) in both layouts: training, exact resume, the native file fused into
either DiT, exports (ComfyUI / kohya / diffusers keys) and the conversions that cannot be exact refused."""
import os

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.lora import LoraError, fuse_lora
from diffsynth.lora.adapters import Adapter, adapter_type, read_adapters, to_standard
from diffsynth.models import load_qwen_image_dit
from diffsynth.trainers import Trainer, main, parse_args
from test_trainer import flags
from test_training_options import assert_resumes_exactly

DIT = "tiny-random/Qwen-Image-Edit/transformer"
EXPORTS = {"loha": "comfyui", "lokr": "kohya", "dora": "comfyui"}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, 4), (1, 4, 4)]
    return (torch.randn(1, 32, 64, generator=g), torch.randn(1, 7, 64, generator=g), None,
            torch.rand(1, generator=g), [shapes])


def forward(model, x):
    with torch.no_grad():
        return model(*x)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from diffsynth.utils.demo_data import write_edit_dataset

    root = tmp_path_factory.mktemp("lora_types")
    write_edit_dataset(str(root / "data"), num_samples=2)
    return str(root / "data"), str(root / "cache")


@pytest.mark.parametrize("lora_type, merged", [("loha", True), ("lokr", True), ("dora", True), ("lokr", False),
                                              ("dora", False)])
def test_adapter_trains_and_its_files_reproduce_the_trained_model(tiny_models, shared, tmp_path, lora_type, merged):
    data, cache = shared
    fmt = EXPORTS[lora_type]
    out = str(tmp_path / "out")
    args = parse_args(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", cache,
                            "--learning_rate", "5e-2", "--lora_type", lora_type, "--export_format", fmt),
                      merged_qkv=merged)
    t = Trainer(args)
    t.setup()
    names = {n for n, p in t.dit.named_parameters() if p.requires_grad}
    prefix = {"loha": ".hada_", "lokr": ".lokr_", "dora": ".lora_"}[lora_type]
    assert names and all(prefix in n for n in names)
    if lora_type == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    t.train()
    t.dit.eval()
    x = inputs()
    trained = forward(t.dit, x)
    native = os.path.join(out, "checkpoint-final.safetensors")
    assert adapter_type(native) == lora_type
    fresh = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=merged).eval()
    base = forward(fresh, x)
    assert (trained - base).abs().max() > 1e-3  # training changed the model
    # the native file, fused into the DiT it was trained on and into the other layout, gives the trained model
    for layout in (merged, not merged):
        model = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=layout).eval()
        fuse_lora(model, native)
        torch.testing.assert_close(forward(model, x), trained, rtol=1e-4, atol=1e-5)
    # the standard-layout export (LyCORIS keys for ComfyUI / kohya) too
    exported = os.path.join(out, f"checkpoint-final-{fmt}.safetensors")
    keys = list(load_file(exported))
    stem = "diffusion_model." if fmt == "comfyui" else "lora_unet_"
    assert all(k.startswith(stem) for k in keys) and not any("qkv" in k for k in keys)
    standard = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=False).eval()
    fuse_lora(standard, exported)
    torch.testing.assert_close(forward(standard, x), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora_type", ["loha", "lokr", "dora"])
def test_adapter_resumes_exactly(tiny_models, shared, tmp_path, lora_type):
    assert_resumes_exactly(tiny_models, shared, tmp_path, "--lora_type", lora_type)


def test_dora_export_loads_in_diffusers(tiny_models, shared, tmp_path, capsys):
    """diffusers' own Qwen LoRA loader reads the DoRA export (lora_magnitude_vector) and computes what we trained.
    ComfyUI drops that vector (measured with its loader, interop/): the run says to export comfyui for it."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    data, cache = shared
    out = str(tmp_path / "out")
    args = parse_args(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", cache,
                            "--learning_rate", "5e-2", "--lora_type", "dora", "--export_format", "diffusers"))
    t = Trainer(args)
    t.setup()
    assert "ComfyUI reads a DoRA's magnitude only as dora_scale (--export_format comfyui" in capsys.readouterr().out
    t.train()
    t.dit.eval()
    x = inputs(1)
    reference = QwenImageTransformer2DModel.from_pretrained(os.path.join(tiny_models, DIT)).eval()
    sd = QwenImageLoraLoaderMixin.lora_state_dict(os.path.join(out, "checkpoint-final-diffusers.safetensors"))
    QwenImageLoraLoaderMixin.load_lora_into_transformer(sd, transformer=reference)
    with torch.no_grad():
        theirs = reference(hidden_states=x[0], encoder_hidden_states=x[1], encoder_hidden_states_mask=None,
                           timestep=x[3], img_shapes=x[4], return_dict=False)[0]
    torch.testing.assert_close(theirs, forward(t.dit, x), rtol=1e-4, atol=1e-5)


def test_continue_an_adapter_with_lora_checkpoint(tiny_models, shared, tmp_path, capsys):
    data, cache = shared
    first = str(tmp_path / "first")
    common = ["--cache_conditioning", cache, "--lora_type", "loha"]
    assert main(flags(tiny_models, data, first, "--max_steps", "2", "--learning_rate", "5e-2", *common)) == 0
    trained = os.path.join(first, "checkpoint-final.safetensors")
    second = str(tmp_path / "second")
    assert main(flags(tiny_models, data, second, "--max_steps", "1", "--learning_rate", "1e-30", "--weight_decay",
                      "0", "--lora_checkpoint", trained, *common)) == 0
    a, b = load_file(trained), load_file(os.path.join(second, "checkpoint-final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-12)
    # another type does not fit: one message naming the fix, exit 2, before any model loads
    assert main(flags(tiny_models, data, str(tmp_path / "third"), "--max_steps", "1", "--lora_checkpoint", trained,
                      "--cache_conditioning", cache, "--lora_type", "lokr", "--models_dir", str(tmp_path / "no"))) == 2
    assert f"--lora_checkpoint {trained} is a loha, not a lokr: continue it with --lora_type loha" in \
        capsys.readouterr().err
    # another alpha: peft's LoHa weights would load as they are and act at the new alpha / rank (twice the delta
    # here), unlike a LoRA's, whose B load_lora_weights rescales
    assert main(flags(tiny_models, data, str(tmp_path / "third"), "--max_steps", "1", "--lora_checkpoint", trained,
                      "--lora_alpha", "8", *common, "--models_dir", str(tmp_path / "no"))) == 2
    assert f"--lora_checkpoint {trained} is a loha trained with --lora_alpha 4, this run has --lora_alpha 8" in \
        capsys.readouterr().err
    # other targets: the file's modules are not the adapters this run injects (the loader found it after loading)
    assert main(flags(tiny_models, data, str(tmp_path / "third"), "--max_steps", "1", "--lora_checkpoint", trained,
                      "--lora_target_modules", "to_qkv,add_qkv_proj", *common, "--models_dir",
                      str(tmp_path / "no"), "--dry_run")) == 2
    err = capsys.readouterr().err
    assert f"--lora_checkpoint {trained} does not fit --lora_target_modules to_qkv,add_qkv_proj: 6 of its modules " \
           "(per block) get no adapter in this run (attn.to_add_out, attn.to_out.0, img_mlp.net.0.proj). Give the " \
           "--lora_target_modules it was trained with (its metadata: to_qkv,add_qkv_proj,to_out.0" in err
    # fewer modules in the file than the run injects: named the other way round
    assert main(flags(tiny_models, data, str(tmp_path / "third"), "--max_steps", "1", "--lora_checkpoint", trained,
                      "--lora_target_modules", "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.0.proj,"
                      "img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2,img_mod.1", *common, "--dry_run")) == 2
    assert "1 adapters of this run (per block) are not in it (img_mod.1)" in capsys.readouterr().err


def test_what_cannot_be_exported_is_refused(tiny_models, data, tmp_path, capsys):
    # formats that cannot hold the adapter: refused with the flags, before anything loads
    for lora_type, fmt in (("loha", "diffusers"), ("lokr", "diffsynth"), ("dora", "diffsynth")):
        with pytest.raises(SystemExit):
            parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--lora_type", lora_type, "--export_format", fmt))
        assert f"--export_format {fmt} cannot hold a {lora_type}" in capsys.readouterr().err
    for fp8 in ("--enable_fp8_training", "--fp8_compute"):  # fp8 compute stores the weights in fp8 as well
        with pytest.raises(SystemExit):
            parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--lora_type", "dora", fp8))
        assert f"does not work with the fp8 weights of {fp8}" in capsys.readouterr().err
    # peft's LoHa/LoKr/DoRA layers break dynamo's graph: with checkpointing not one block compiled (the run said
    # "0 graph(s)" and trained eager), so --compile would do nothing it says
    for lora_type in ("loha", "lokr", "dora"):
        with pytest.raises(SystemExit) as e:
            parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--lora_type", lora_type, "--compile",
                             "--use_gradient_checkpointing"))
        assert e.value.code == 2
        assert f"--compile does not compile a --lora_type {lora_type} DiT" in capsys.readouterr().err
    assert parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--compile")).compile
    # a merged LoKr whose row factor does not divide by 3 has no standard-layout form
    w = torch.randn(8, 4)
    lokr = Adapter("lokr", {"lokr_w1": w, "lokr_w2_a": torch.randn(24, 2), "lokr_w2_b": torch.randn(2, 16)})
    with pytest.raises(LoraError, match="row factor \\(8 rows of lokr_w1\\) divides by 3"):
        to_standard({"transformer_blocks.0.attn.to_qkv": lokr})
    # an exact split: kron(w1 rows, w2) blocks equal the row blocks of kron(w1, w2)
    w1 = torch.randn(6, 4)
    lokr = Adapter("lokr", {"lokr_w1": w1, "lokr_w2": torch.randn(32, 16)}, scale=0.5)
    parts = to_standard({"transformer_blocks.0.attn.to_qkv": lokr})
    full = lokr.delta(None)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(parts[f"transformer_blocks.0.attn.{part}"].delta(None), full[i * 64:(i + 1) * 64])


def test_dora_for_comfyui_is_computed_for_comfyuis_rule(tiny_models, shared, tmp_path, capsys):
    """ComfyUI applies an output-axis dora_scale d as (W + dW) * d / (||W|| + eps) (base-weight norms); the
    export's d makes that equal peft's m (W + dW) / ||W + dW||. Computed here from that rule, independently."""
    data, cache = shared
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", cache, "--learning_rate",
                      "5e-2", "--lora_type", "dora", "--export_format", "comfyui"), merged_qkv=False) == 0
    assert "ComfyUI reads a DoRA" not in capsys.readouterr().out  # this export is the one it reads
    native = load_file(os.path.join(out, "checkpoint-final.safetensors"))
    comfy = load_file(os.path.join(out, "checkpoint-final-comfyui.safetensors"))
    model = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=False)
    name = "transformer_blocks.0.attn.to_q"
    w = dict(model.named_parameters())[f"{name}.weight"].detach()
    m, A, B = native[f"{name}.lora_magnitude_vector"], native[f"{name}.lora_A.weight"], native[f"{name}.lora_B.weight"]
    v = w + B @ A  # alpha = rank: scale 1
    peft = m[:, None] * v / v.norm(dim=1, keepdim=True)
    c = {k.split(f"{name}.")[1]: t for k, t in comfy.items() if k.startswith(f"diffusion_model.{name}.")}
    assert set(c) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    diff = (c["lora_up.weight"] @ c["lora_down.weight"]) * (c["alpha"] / c["lora_down.weight"].shape[0])
    calc = (w + diff) * (c["dora_scale"] / (w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
    torch.testing.assert_close(calc, peft, rtol=1e-5, atol=1e-6)
    # read back (ComfyUI's rule for dora_scale) it is the same adapter
    modules, _ = read_adapters(os.path.join(out, "checkpoint-final-comfyui.safetensors"))
    torch.testing.assert_close(w + modules[name].delta(w), peft, rtol=1e-5, atol=1e-6)
    # the conversion script has no base weights: it refuses instead of writing a wrong dora_scale
    from diffsynth.lora import convert_lora_file

    with pytest.raises(LoraError, match="needs the base model's weights"):
        convert_lora_file(os.path.join(out, "checkpoint-final.safetensors"), str(tmp_path / "x.safetensors"),
                          "to_standard", format="comfyui")
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_save_precision_bf16_keeps_a_doras_magnitude_and_casts_the_copies(tiny_models, shared, tmp_path):
    """--save_precision bf16 with a DoRA: the magnitude (a base weight row's norm) stays fp32, since bf16's rounding
    of it moved each row by ~25% of the learned delta here; the adapter copies (ComfyUI's dora_scale computed from
    the base weights, a LoHa's kohya keys) are written in bf16 as the help says, not fp32."""
    data, cache = shared
    runs = {}
    for name, extra in (("fp32", ()), ("bf16", ("--save_precision", "bf16"))):
        runs[name] = str(tmp_path / name)
        assert main(flags(tiny_models, data, runs[name], "--max_steps", "2", "--cache_conditioning", cache,
                          "--lora_type", "dora", "--export_format", "comfyui", *extra), merged_qkv=False) == 0
    model = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=False)
    params = dict(model.named_parameters())
    for file in ("checkpoint-final.safetensors", "checkpoint-final-comfyui.safetensors"):
        sd = load_file(os.path.join(runs["bf16"], file))
        for k, v in sd.items():
            keep = k.endswith((".lora_magnitude_vector", ".dora_scale", ".alpha"))
            assert v.dtype == (torch.float32 if keep else torch.bfloat16), (file, k, v.dtype)
        full, half = read_adapters(os.path.join(runs["fp32"], file))[0], read_adapters(sd)[0]
        for name, a in full.items():
            w = params[f"{name}.weight"].detach()
            d32, d16 = a.delta(w), half[name].delta(w)
            assert (d32 - d16).norm() <= 0.02 * d32.norm(), (file, name)
    out = str(tmp_path / "loha")
    assert main(flags(tiny_models, data, out, "--max_steps", "1", "--cache_conditioning", cache, "--lora_type",
                      "loha", "--export_format", "kohya", "--save_precision", "bf16"), merged_qkv=True) == 0
    kohya = load_file(os.path.join(out, "checkpoint-final-kohya.safetensors"))
    assert {str(v.dtype) for k, v in kohya.items() if not k.endswith(".alpha")} == {"torch.bfloat16"}


@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_native_loha_lokr_files_carry_alpha_for_tensor_only_readers(tiny_models, tmp_path, lora_type):
    """ComfyUI (and LyCORIS) take a LoHa's / LoKr's scale from `<module>.alpha` tensors divided by the rank of the
    decomposed factor, never from the metadata: a native file (a standard run's checkpoint, loaded as it is) must
    carry them. Without them ComfyUI 0.3.64's own loader applied a LoHa with alpha 8, rank 4 at half its delta
    (interop/check_consumer.py comfyui). ComfyUI's rule is computed here from the tensors alone."""
    from diffsynth.lora import inject_lora, lora_state_dict
    from diffsynth.lora.adapters import load_adapter_weights, save_adapter

    rank, alpha, targets = 2, 6.0, "to_q,to_out.0,img_mlp.net.2"
    dit = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=False)
    inject_lora(dit, targets, rank, alpha, lora_type=lora_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in dit.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g))
    path = str(tmp_path / "native.safetensors")
    save_adapter(lora_state_dict(dit), path, lora_type, rank, alpha, targets, "standard")
    sd = load_file(path)
    modules, _ = read_adapters(path)  # this project: peft's alpha / rank from the metadata
    assert len(modules) == 6  # 3 targets in each of 2 blocks
    for name, adapter in modules.items():
        t = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if lora_type == "loha":
            diff, dim = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]), t["hada_w1_b"].shape[0]
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            diff = torch.kron(w1, w2)
            dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0]
        comfy = diff * (t["alpha"] / dim)
        torch.testing.assert_close(comfy, adapter.delta(None), rtol=1e-5, atol=1e-6)
        assert adapter.scale == alpha / rank
    # the file still continues training (--lora_checkpoint): the .alpha tensors are no adapter weights
    assert sorted(load_adapter_weights(dit, path)) == sorted(k for k in sd if not k.endswith(".alpha"))
