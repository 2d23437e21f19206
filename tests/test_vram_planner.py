"""The VRAM planner's arithmetic: exact parameter counts of the real 20B model from its shapes, weight and
activation bytes on known configurations, its error on the measured H100 peaks, the cheapest fit for a budget,
and the trainer's --dry_run / --vram_budget (which load nothing)."""
import json
import re
from dataclasses import replace

import pytest
import torch

from diffsynth.utils import vram_planner as vp

D, TEXT = 3072, 3584
MERGED = vp.DEFAULT_MERGED_TARGETS
STANDARD = MERGED.replace("to_qkv,add_qkv_proj", "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj")


def linear(i, o, bias=True):
    return i * o + (o if bias else 0)


@pytest.fixture(scope="module")
def real():
    return vp.dit_counts(lora_targets=MERGED, rank=32)


def test_parameter_counts_of_the_real_model(real):
    """Counted by hand from the architecture (qwen-image-facts.md), against the planner's meta-device count."""
    block = (2 * linear(D, 6 * D)  # img_mod, txt_mod
             + 2 * linear(D, 3 * D) + 2 * linear(D, D) + 4 * 128  # to_qkv, add_qkv_proj, to_out.0, to_add_out, norms
             + 2 * (linear(D, 4 * D) + linear(4 * D, D)))  # img_mlp, txt_mlp
    outer = (linear(64, D) + TEXT + linear(TEXT, D)  # img_in, txt_norm, txt_in
             + linear(256, D) + linear(D, D)  # timestep embedder
             + linear(D, 2 * D) + linear(D, 2 * 2 * 16))  # norm_out.linear, proj_out
    assert real.total == 60 * block + outer == 20_430_401_088
    assert real.block_linear + real.block_other == block
    assert real.block_rows == 2 * 6 * D + 2 * 3 * D + 2 * D + 2 * (4 * D + D)  # one fp8 scale per output row
    # LoRA r=32: r * (in + out) per adapted linear; a merged to_qkv LoRA shares one A for q, k and v
    per_block = 32 * (2 * (D + 3 * D) + 2 * (D + D) + 2 * (2 * (D + 4 * D)))
    assert real.lora == 60 * per_block == 188_743_680
    standard = vp.dit_counts(merged_qkv=False, lora_targets=STANDARD, rank=32)
    assert standard.total == real.total and standard.lora == 212_336_640


def test_text_encoder_and_vae_counts_are_those_of_the_official_configs():
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Qwen/Qwen-Image:text_encoder/config.json (Qwen2.5-VL-7B) in the numbers that decide the shapes
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        tie_word_embeddings=False)
    with torch.device("meta"):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage()  # diffusers' defaults are Qwen-Image's VAE (base_dim 96, dim_mult 1,2,4,4)
    assert sum(p.numel() for p in text_encoder.parameters()) == vp.TEXT_ENCODER_PARAMS
    assert sum(p.numel() for p in vae.parameters()) == vp.VAE_PARAMS


def test_weight_bytes_on_known_configurations(real):
    s = vp.Setup()
    assert vp.weight_bytes(real, s) == 2 * real.total == 40_860_802_176  # bf16
    fp8 = real.num_layers * (real.block_linear + 4 * real.block_rows + 2 * real.block_other) \
        + real.outer_linear + 4 * real.outer_rows + 2 * real.outer_other
    assert vp.weight_bytes(real, replace(s, fp8=True)) == fp8
    assert 19.0 < fp8 / vp.GIB < 19.1  # + 0.70 GiB of LoRA: the measured "19.8 GiB resident"
    # swapping N blocks keeps prefetch + 1 of them on the GPU
    for n, prefetch in ((16, 1), (32, 2), (60, 1)):
        swapped = vp.weight_bytes(real, replace(s, blocks_to_swap=n, prefetch=prefetch))
        assert vp.weight_bytes(real, s) - swapped == (n - prefetch - 1) * vp.block_bytes(real, s)
    assert vp.block_bytes(real, s) == 2 * (339_738_624 + 92_672)  # 680 MB per bf16 block
    assert vp.weight_bytes(real, replace(s, fsdp=True, processes=8)) < vp.weight_bytes(real, s) / 4


def test_activation_bytes(real):
    s = vp.Setup(batch=2, target_tokens=4096, edit_tokens=4096, text_tokens=160)
    unit = 2 * 8352 * D * 2
    assert vp.hidden_unit(real, s) == unit
    peak = vp.training_peak(real, s)
    assert peak.parts["block inputs kept for the backward"] == 60 * unit
    assert peak.parts["one block's recompute and backward"] == vp.HIDDEN_UNITS_CKPT * unit
    assert peak.parts["optimizer state (from step 2)"] == 8 * real.lora  # AdamW
    eight_bit = vp.training_peak(real, replace(s, optimizer_state_bytes=vp.OPTIMIZER_STATE_BYTES["adamw8bit"]))
    assert peak.peak - eight_bit.peak == 6 * real.lora
    assert vp.training_peak(real, replace(s, ema=True)).peak - peak.peak == 4 * real.lora
    assert peak.first_step == peak.peak - 8 * real.lora
    offloaded = vp.training_peak(real, replace(s, checkpointing_offload=True))
    assert peak.peak - offloaded.peak == 60 * unit  # the block inputs wait in host memory
    no_ckpt = vp.training_peak(real, replace(s, checkpointing=False))
    assert no_ckpt.gib() > 150  # every block's activations: no GPU holds that at 1024x1024, batch 2
    # with a complete conditioning cache the encoders are not on the GPU; without, 16.6 GB of text encoder are
    with_encoders = vp.training_peak(real, replace(s, encoders_on_gpu=True))
    assert with_encoders.peak - peak.peak == 2 * (vp.TEXT_ENCODER_PARAMS + vp.VAE_PARAMS)


def test_calibration_error_on_the_measured_h100_peaks(real):
    """The issue's goal: the planner within 10% of measured peaks. On the two H100 figures it is within 1%."""
    rows = vp.calibration_errors(real)
    assert [r[0] for r in rows] == [p["label"] for p in vp.CALIBRATION]
    for label, predicted, measured, error in rows:
        assert abs(error) < 0.01, (label, predicted, measured)
    # and the resident weights (DiT + LoRA) reproduce the measured resident figures to 0.15 GiB
    for point in vp.CALIBRATION:
        s = vp.Setup(fp8=point["fp8"])
        resident = (vp.weight_bytes(real, s) + 4 * real.lora) / vp.GIB
        assert abs(resident - point["measured_resident_gib"]) < 0.15, (point, resident)


def test_the_blocks_save_no_more_than_the_planner_assumes():
    """What autograd keeps for one block's backward, measured on real tensors (CPU, bf16 autocast, LoRA on the
    default targets, at a small width): per token it must stay within the planner's per-block figure."""
    from diffsynth.lora import inject_lora
    from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV

    for cls, targets in ((QwenImageDiTMergedQKV, MERGED), (QwenImageDiT, STANDARD)):
        torch.manual_seed(0)
        model = cls(num_layers=1, num_attention_heads=4, attention_head_dim=64, axes_dims_rope=(8, 28, 28),
                    joint_attention_dim=64).to(torch.bfloat16).requires_grad_(False)
        inject_lora(model, targets, rank=4)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        d, image, text = 256, 512, 64
        x = torch.randn(1, image, d, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randn(1, text, d, dtype=torch.bfloat16, requires_grad=True)
        rope = model.pos_embed([(1, 16, 16), (1, 16, 16)], text, "cpu")
        weights = {p.data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            if tensor.data_ptr() not in weights:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.transformer_blocks[0](x, t, torch.randn(1, d, dtype=torch.bfloat16), rope)
        units = sum(storages.values()) / ((image + text) * d * 2)
        assert 16 < units <= vp.HIDDEN_UNITS_SAVED - 1, (cls.__name__, units)


def test_cheapest_fit(real):
    s = vp.Setup()  # 1024x1024 edit, batch 1, r=32, the trainer's text length
    for budget, most in ((24, 22), (16, 14)):
        cand, peak, cost = vp.cheapest_fit(real, s, budget * vp.GIB)
        assert peak.gib() <= most and cand.checkpointing and cand.fp8 and cand.blocks_to_swap > 0
        # the smallest swap that fits: one block fewer does not
        assert vp.training_peak(real, replace(cand, blocks_to_swap=cand.blocks_to_swap - 1)).gib() > most
        assert "--cache_conditioning" in cand.flags()
    # 80 GB: bf16 with room to spare, spent on blocks that keep their activations: the fewest checkpointed blocks
    # that fit (one fewer does not), each block out of the recompute making the step cheaper
    cand, peak, cost = vp.cheapest_fit(real, s, 80 * vp.GIB)
    assert (cand.fp8, cand.blocks_to_swap, cand.checkpointing) == (False, 0, True) and 30 < cand.checkpointed_blocks < 60
    assert peak.gib() <= 78 < vp.training_peak(real, replace(cand, checkpointed_blocks=cand.checkpointed_blocks - 1)).gib()
    assert cost == vp.step_cost(real, cand) < 1.0
    assert cand.flags()[:3] == ["--use_gradient_checkpointing", "--blocks_to_checkpoint", str(cand.checkpointed_blocks)]
    cand, peak, cost = vp.cheapest_fit(real, s, 48 * vp.GIB)
    assert (cand.fp8, cand.blocks_to_swap, cand.checkpointed_blocks, cost) == (False, 0, None, 1.0)  # fits as it is
    assert vp.cheapest_fit(real, replace(s, batch=64), 24 * vp.GIB) is None
    # swapping costs more the more blocks move, fp8 blocks cost half as much to move as bf16 ones
    costs = [vp.step_cost(real, replace(s, fp8=True, blocks_to_swap=n)) for n in (0, 8, 16, 32)]
    assert costs == sorted(costs)


def test_blocks_not_checkpointed_keep_their_activations(real):
    """--blocks_to_checkpoint N: the 60 - N blocks not checkpointed hold their saved activations instead of their
    input; the step loses their recompute."""
    s = vp.Setup()
    unit = vp.hidden_unit(real, s)
    every = vp.training_peak(real, s).peak
    for kept in (1, 30, 59):
        partial = vp.training_peak(real, replace(s, checkpointed_blocks=kept)).peak
        assert partial - every == (60 - kept) * (vp.HIDDEN_UNITS_SAVED - 1) * unit
    assert vp.training_peak(real, replace(s, checkpointed_blocks=60)).peak == every
    costs = [vp.step_cost(real, replace(s, checkpointed_blocks=k)) for k in (1, 30, 60)]
    assert costs == sorted(costs) and costs[-1] == 1.0
    assert costs[0] == pytest.approx((1 + 59 * vp.NO_CHECKPOINTING_FACTOR[False]) / 60)


def test_selective_checkpointing_keeps_an_attention_output_per_checkpointed_block(real):
    """--selective_checkpointing: each checkpointed block keeps its attention output (1 U and the log-sum-exp), also
    with the offload; its recompute loses attention's forward; the planner spends memory on it before it takes blocks
    out of the recompute (the 80 GB pick has both)."""
    s = vp.Setup()
    unit = vp.hidden_unit(real, s)
    for base in (s, replace(s, checkpointed_blocks=40), replace(s, checkpointing_offload=True)):
        sel = replace(base, keep_attention=True)
        kept = vp.checkpointed(real, base)
        assert vp.training_peak(real, sel).peak - vp.training_peak(real, base).peak == \
            int(kept * vp.ATTENTION_KEPT_UNITS * unit)
        assert "--selective_checkpointing" in sel.flags() and "--selective_checkpointing" not in base.flags()
        saved = (vp.step_cost(real, base) - vp.step_cost(real, sel)) * vp.STEP_SECONDS[(False, "bf16")]
        assert saved == pytest.approx(kept * vp.ATTENTION_FORWARD_SECONDS)
    # without checkpointing there is nothing to keep
    off = replace(s, checkpointing=False)
    assert vp.training_peak(real, replace(off, keep_attention=True)).peak == vp.training_peak(real, off).peak
    assert "--selective_checkpointing" not in replace(off, keep_attention=True).flags()
    cand, _, _ = vp.cheapest_fit(real, s, 80 * vp.GIB)
    assert cand.keep_attention and cand.checkpointed_blocks < 60
    # the trainer's flag reaches the plan
    from diffsynth.trainers import build_parser

    args = build_parser(True).parse_args(["--dataset_metadata_path", "m.csv", "--model_paths", "[]",
                                          "--lora_base_model", "dit", "--use_gradient_checkpointing",
                                          "--selective_checkpointing"])
    assert vp.setup_from_args(args).keep_attention


def test_step_cost_follows_compile_and_fp8_compute(real):
    """The ranking uses the H100 step times of the mode the run is in: --compile makes the block copies of a swap
    harder to hide, --fp8_compute with --compile is the cheapest resident step (measured 1.164 vs 1.238 s)."""
    s = vp.Setup()
    fp8 = replace(s, fp8=True)
    assert vp.step_cost(real, s) == vp.step_cost(real, replace(s, compiled=True)) == 1.0
    assert vp.step_cost(real, fp8) == pytest.approx(2.181 / 1.822)
    assert vp.step_cost(real, replace(fp8, fp8_compute=True)) == pytest.approx(2.319 / 1.822)
    assert vp.step_cost(real, replace(fp8, fp8_compute=True, compiled=True)) == pytest.approx(1.164 / 1.238)
    assert vp.step_cost(real, replace(fp8, compiled=True)) == pytest.approx(2.181 / 1.822)  # not measured: eager's ratio
    swapped = replace(fp8, blocks_to_swap=32)
    assert vp.step_cost(real, replace(swapped, compiled=True)) > vp.step_cost(real, swapped)
    # an 80 GB card with --compile --fp8_compute: fp8 compute, and more blocks out of the recompute than in bf16
    compute, _, cost = vp.cheapest_fit(real, replace(s, compiled=True, fp8_compute=True), 80 * vp.GIB)
    bf16, _, bf16_cost = vp.cheapest_fit(real, replace(s, compiled=True), 80 * vp.GIB)
    assert compute.fp8 and "--fp8_compute" in compute.flags() and "--enable_fp8_training" not in compute.flags()
    assert compute.checkpointed_blocks < bf16.checkpointed_blocks and cost < bf16_cost < 1.0


@pytest.mark.parametrize("text, gib", [("24GB", 24), ("16GiB", 16), ("80", 80), ("12g", 12), ("16384MB", 16)])
def test_parse_vram(text, gib):
    assert vp.parse_vram(text) == gib * vp.GIB


def test_dry_run_prints_the_plan_and_loads_nothing(data, tmp_path, monkeypatch, capsys):
    from diffsynth.models import dit_loader
    from diffsynth.pipelines import qwen_image
    from diffsynth.trainers import main

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model")

    monkeypatch.setattr(dit_loader, "load_qwen_image_dit", refuse)
    monkeypatch.setattr(qwen_image.QwenImagePipeline, "from_pretrained", refuse)
    argv = ["--dataset_base_path", data, "--dataset_metadata_path", f"{data}/metadata.csv", "--output_path",
            str(tmp_path / "out"), "--model_id_with_origin_paths", "Qwen/Qwen-Image-Edit:x", "--lora_base_model", "dit",
            "--use_gradient_checkpointing", "--cache_conditioning", "--dry_run"]
    assert main(argv + ["--vram_budget", "24GB"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["vram_budget"] == "24GB"  # stdout stays the resolved settings
    plan = out.err
    assert "20.43B parameters (merged QKV); LoRA r=32: 188.7M parameters" in plan
    assert "4096 target + 4096 edit-image + ~1433 text tokens" in plan
    assert "predicted peak GPU memory: 45.7 GiB" in plan and "DiT weights" in plan
    assert "cheapest flags that fit: --use_gradient_checkpointing --selective_checkpointing --enable_fp8_training " \
           "--blocks_to_swap" in plan
    assert "your flags are predicted NOT to fit" in plan
    assert "calibration (first-step peaks measured on an H100" in plan
    # the planner follows the flags: fp8 + swap is far smaller than bf16
    assert main(argv + ["--enable_fp8_training", "--blocks_to_swap", "20"]) == 0
    plan = capsys.readouterr().err
    assert "flags: --use_gradient_checkpointing --enable_fp8_training --blocks_to_swap 20" in plan
    peak = float(plan.split("predicted peak GPU memory: ")[1].split(" GiB")[0])
    assert 15 < peak < 22
    # fewer checkpointed blocks: their activations are counted, and an 80 GB card is told how many
    assert main(argv + ["--blocks_to_checkpoint", "50", "--vram_budget", "80GB"]) == 0
    plan = capsys.readouterr().err
    assert "flags: --use_gradient_checkpointing --blocks_to_checkpoint 50 --cache_conditioning" in plan
    assert "activations of the blocks not checkpointed" in plan and "your flags fit as given" in plan
    assert "cheapest flags that fit: --use_gradient_checkpointing --blocks_to_checkpoint 39 --selective_checkpointing " \
           "--cache_conditioning" in plan
    # auto: resolved for the budget in the dry run's settings (for the flags as given: no selective checkpointing,
    # so more blocks out of the recompute than the pick above), or left to the run's start without one
    assert main(argv + ["--blocks_to_checkpoint", "auto", "--vram_budget", "80GB"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["blocks_to_checkpoint"] == 37
    assert "--blocks_to_checkpoint auto, --vram_budget 80GB: 37 of 60 blocks checkpointed, the fewest" in out.err
    # a budget that nothing fits says so (and checkpoints every block) instead of calling that a fit
    assert main(argv + ["--blocks_to_checkpoint", "auto", "--vram_budget", "1GB"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["blocks_to_checkpoint"] is None
    assert "--blocks_to_checkpoint auto, --vram_budget 1GB: 60 of 60 blocks checkpointed: even so the VRAM planner " \
           "predicts" in out.err and "more than fits" in out.err
    assert main(argv + ["--blocks_to_checkpoint", "auto", "--selective_checkpointing", "--vram_budget", "80GB"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["blocks_to_checkpoint"] == 39  # the kept attention outputs take room too
    assert "flags: --use_gradient_checkpointing --blocks_to_checkpoint 39 --selective_checkpointing" in out.err
    assert main(argv + ["--blocks_to_checkpoint", "auto"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["blocks_to_checkpoint"] == "auto"
    assert "--blocks_to_checkpoint auto: decided when the run starts, from the GPU's free memory" in out.err
    # --compile and --fp8_compute are kept and priced: the plan says fp8 compute
    assert main(argv + ["--compile", "--fp8_compute", "--vram_budget", "80GB"]) == 0
    plan = capsys.readouterr().err
    assert "flags: --use_gradient_checkpointing --fp8_compute --cache_conditioning" in plan
    assert "cheapest flags that fit: --use_gradient_checkpointing --blocks_to_checkpoint 24 --selective_checkpointing " \
           "--fp8_compute --cache_conditioning" in plan and "the all-resident bf16 step (both with --compile)" in plan


def test_bad_budget_is_a_flag_error(capsys):
    from diffsynth.trainers import main

    for budget in ("lots", "0GB", "0"):  # a budget of nothing is no budget either
        with pytest.raises(SystemExit) as e:
            main(["--dataset_metadata_path", "m.csv", "--model_paths", "[]", "--vram_budget", budget, "--dry_run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--vram_budget {budget!r}: write the GPU's memory, e.g. 24GB" in err
        assert len(err.strip().splitlines()) == 1 and "usage:" not in err  # one line, not argparse's usage


def test_the_quickstart_tables_are_the_planners():
    """QUICKSTART.md's "which flags for my GPU" tables: every row's flags and predicted peak are what the planner
    says for that card (so the docs cannot drift from the code)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "QUICKSTART.md").read_text()
    section = text.split("## Which flags for my GPU")[1].split("\n## ")[0]
    counts = vp.dit_counts(lora_targets=MERGED, rank=32)
    recipe = vp.Setup(compiled=True)  # the recipe compiles
    training = re.findall(r"^\| (\d+) GB \| `([^`]+)` \| ([0-9.]+) GiB \| ([0-9.]+)x \|", section, re.M)
    assert [int(g) for g, *_ in training] == [80, 48, 32, 24, 16, 12]
    fp8_resident = vp.step_cost(counts, replace(recipe, fp8=True))
    for gib, flags, peak, cost in training:
        cand, predicted, estimate = vp.cheapest_fit(counts, recipe, int(gib) * vp.GIB)
        assert flags.split() == [f for f in cand.flags() if f != "--use_gradient_checkpointing"], gib
        assert float(peak) == round(predicted.gib(), 1) and float(cost) == round(estimate / fp8_resident, 2), gib
    inference = re.findall(r"^\| (\d+) GB \| (?:`([^`]*)`|\(none\)) \| ([0-9.]+) GiB \|$", section, re.M)
    assert [int(g) for g, *_ in inference] == [80, 48, 24, 16, 12]
    for gib, flags, peak in inference:
        offload, swap, predicted = vp.inference_fit(counts, vp.Setup(), int(gib) * vp.GIB)
        expected = ([f"--offload {offload}" if offload == "sequential" else "--offload"] if offload else []) \
            + ([f"--blocks_to_swap {swap}"] if swap else [])
        assert flags == " ".join(expected) and float(peak) == round(predicted.gib(), 1), gib
