"""--network_dropout: kohya's / musubi-tuner's dropout on the LoRA's rank activations (y = base(x) + B drop(A x) s),
in training only, in the fused LoRA forward of both DiT layouts; checkpoint recompute, exact resume, refusals."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffsynth.lora.fused_linear import FusedLoraLinear, fuse_lora_forward
from diffsynth.models import QwenImageDiT, QwenImageDiTMergedQKV
from diffsynth.trainers import main, parse_args
from test_compile import lora_dit, step
from test_dit import edit_batch
from test_fused_lora import pair
from test_trainer import flags
from test_training_options import assert_older_state_resumes_as, assert_resumes_exactly, run, weights


def layer_with_dropout(p):
    model, _ = pair(alpha=6.0)  # scaling 1.5, non-zero B
    fuse_lora_forward(model, p)
    return model


def test_training_forward_drops_the_rank_activations_as_kohya():
    model = layer_with_dropout(0.5).train()
    layer = model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 64)
    A.requires_grad_(True)
    torch.manual_seed(7)
    y = model(x)
    (gA,) = torch.autograd.grad(y.square().sum(), A)
    torch.manual_seed(7)  # the same mask, drawn by hand: dropout of h = A x (not of x, as peft's lora_dropout)
    h = F.dropout(F.linear(x, A), 0.5)
    y_ref = layer.base_layer(x) + F.linear(h, B) * 1.5
    (gA_ref,) = torch.autograd.grad(y_ref.square().sum(), A)
    assert (h == 0).float().mean().item() == pytest.approx(0.5, abs=0.2)  # about half of the 60 activations
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)  # the scale goes into the GEMM: fp32 rounding only
    # fp32 rounding, squared by the loss (another mask would move whole rows of the gradient)
    assert ((gA - gA_ref).norm() / gA_ref.norm()).item() < 1e-5
    torch.manual_seed(7)
    assert not torch.equal(y, layer_with_dropout(0.0).train()(x))


def test_no_dropout_and_eval_mode_are_todays_output_and_draw_nothing():
    x = torch.randn(3, 5, 64)
    today = pair(alpha=6.0)[0].train()(x)  # a layer as inject_lora made it before --network_dropout
    assert torch.equal(layer_with_dropout(0.0).train()(x), today)
    rng = torch.get_rng_state()
    assert torch.equal(layer_with_dropout(0.5).eval()(x), today)
    assert torch.equal(torch.get_rng_state(), rng)  # eval (validation, inference) draws no random numbers
    assert "network_dropout" not in str(layer_with_dropout(0.5).state_dict().keys())


def test_peft_forward_with_dropout_set_is_refused_in_training():
    model = layer_with_dropout(0.1)
    model[0].lora_dropout["default"] = nn.Dropout(0.1)  # a case the fused forward leaves to peft's forward
    with pytest.raises(RuntimeError, match="network dropout 0.1 is applied by the fused LoRA forward only"):
        model.train()(torch.randn(2, 64))
    model.eval()(torch.randn(2, 64))  # in eval nothing is dropped anyway


@pytest.mark.parametrize("cls", [QwenImageDiTMergedQKV, QwenImageDiT], ids=["merged", "standard"])
def test_both_layouts_drop_in_every_lora_layer_and_checkpointing_recomputes_the_same_mask(cls):
    batch = edit_batch(batch=1, pad=False)
    plain, checkpointed = lora_dit(cls, checkpointing=False), lora_dit(cls)
    for model in (plain, checkpointed):
        assert fuse_lora_forward(model, 0.3) == sum(isinstance(m, FusedLoraLinear) for m in model.modules())
    qkv = "transformer_blocks.0.attn." + ("to_qkv" if cls is QwenImageDiTMergedQKV else "to_q")
    assert plain.get_submodule(qkv).network_dropout == 0.3
    torch.manual_seed(3)
    out, grads = step(plain, batch)
    torch.manual_seed(3)
    out_c, grads_c = step(checkpointed, batch)  # the recompute in backward redraws the forward's mask
    assert torch.equal(out, out_c)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-6, atol=1e-9, msg=name)
    torch.manual_seed(3)
    today = lora_dit(cls, checkpointing=False)
    assert not torch.equal(step(today, batch)[0], out)  # training drops
    with torch.no_grad():
        assert torch.equal(plain.eval()(*batch), today.eval()(*batch))  # eval does not


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from diffsynth.utils.demo_data import write_edit_dataset

    root = tmp_path_factory.mktemp("network_dropout")
    write_edit_dataset(str(root / "data"), num_samples=2)
    return str(root / "data"), str(root / "cache")


def test_a_run_with_dropout_trains_otherwise_resumes_exactly_and_refuses_another_p(tiny_models, shared, tmp_path,
                                                                                    capsys):
    full = assert_resumes_exactly(tiny_models, shared, tmp_path, "--network_dropout", "0.1")
    without = run(tiny_models, shared, tmp_path / "without", "--save_steps", "2")
    assert weights(full).keys() == weights(without).keys()  # the same LoRA file, other weights
    assert any(not torch.equal(weights(full)[k], weights(without)[k]) for k in weights(full))

    data, cache = shared
    argv = flags(tiny_models, data, full, "--dataset_repeat", "2", "--max_steps", "4", "--cache_conditioning", cache,
                 "--resume_from_checkpoint", "latest")
    assert main(argv + ["--network_dropout", "0.2"]) == 2
    assert "--network_dropout: state 0.1, this run 0.2" in capsys.readouterr().err
    # a state written before the key existed trained without dropout: it resumes without, not with it
    assert_older_state_resumes_as(os.path.join(without, "checkpoints", "step-2"), "network_dropout", 0.0, 0.1)


def test_dropout_needs_a_lora_and_dry_run_shows_it(tiny_models, data, tmp_path, capsys):
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--network_dropout", "0.1")
    at = argv.index("--lora_base_model")
    with pytest.raises(SystemExit) as e:
        parse_args(argv[:at] + argv[at + 4:])  # without --lora_base_model dit --lora_rank 4: a full fine-tune
    assert e.value.code == 2
    assert "--network_dropout drops LoRA activations: it needs --lora_base_model dit" in capsys.readouterr().err
    assert main(argv + ["--dry_run"]) == 0
    assert json.loads(capsys.readouterr().out)["network_dropout"] == 0.1
