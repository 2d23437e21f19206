"""LoRA+ (--loraplus_lr_ratio): LoRA's B matrices train at R x the learning rate, everything else at it, with every
optimizer and lr schedule; the ratio is part of a training state's setup; the flags it cannot work with are refused
before anything loads."""
import csv
import importlib.util
import json
import math
import os

import pytest
import torch

from diffsynth.lora import inject_lora
from diffsynth.models import load_qwen_image_dit
from diffsynth.trainers import main, parse_args
from diffsynth.trainers.args import DEFAULT_TARGETS
from diffsynth.trainers.optim import create_lr_scheduler, create_optimizer, loraplus_groups
from test_lora_types import DIT
from test_trainer import flags
from test_training_options import assert_older_state_resumes_as, assert_resumes_exactly


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from diffsynth.utils.demo_data import write_edit_dataset

    root = tmp_path_factory.mktemp("loraplus")
    write_edit_dataset(str(root / "data"), num_samples=2)
    return str(root / "data"), str(root / "cache")


def names_in(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "standard"])
@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_groups_put_the_b_matrices_at_ratio_times_the_rate(tiny_models, merged, lora_type):
    dit = load_qwen_image_dit(os.path.join(tiny_models, DIT), merged_qkv=merged)
    dit.requires_grad_(False)
    inject_lora(dit, DEFAULT_TARGETS[merged], 4, lora_type=lora_type)
    trainable = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    optimizer = create_optimizer("adamw", loraplus_groups(trainable, 4.0), 1e-3, 0.01)
    base, up = names_in(optimizer, dit)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.01), (4e-3, 0.01)]
    assert up == sorted(n for n, _ in trainable if n.endswith(".lora_B.default.weight"))
    assert base == sorted(n for n, _ in trainable if n not in up)
    assert {n.rsplit(".", 3)[1] for n in base} == ({"lora_A", "lora_magnitude_vector"} if lora_type == "dora"
                                                   else {"lora_A"})
    attn = "transformer_blocks.0.attn."
    if merged:  # one A and one B for q, k and v together
        assert f"{attn}to_qkv.lora_B.default.weight" in up and f"{attn}to_qkv.lora_A.default.weight" in base
    else:
        assert {f"{attn}to_{x}.lora_B.default.weight" for x in "qkv"} <= set(up)
        assert {f"{attn}to_{x}.lora_A.default.weight" for x in "qkv"} <= set(base)
    blocks = len(dit.transformer_blocks)
    assert len(up) == blocks * len(DEFAULT_TARGETS[merged].split(","))  # one B per adapted layer
    if lora_type == "dora":
        assert f"{attn}to_out.0.lora_magnitude_vector.default.weight" in base


def test_the_schedule_scales_each_groups_own_rate():
    """LambdaLR multiplies each group's initial rate: B stays at R x A's through warm-up and decay."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = create_optimizer("adamw", loraplus_groups([("x.lora_A.w", a), ("x.lora_B.w", b)], 4.0), 1e-3, 0.0)
    scheduler = create_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=6, min_ratio=0.1)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr())
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        optimizer.step()
        scheduler.step()
    assert rates[:3] == [[0.5e-3, 2e-3], [1e-3, 4e-3], [1e-3, 4e-3]]  # warm-up, the peak where the decay starts
    for base, up in rates[3:]:
        assert base < 1e-3 and math.isclose(up, 4 * base, rel_tol=1e-12)
    # --optimizer_args lr=... overrides --learning_rate: the B group follows it
    optimizer = create_optimizer("adamw", loraplus_groups([("x.lora_A.w", a), ("x.lora_B.w", b)], 4.0), 1e-3, 0.0,
                                 {"lr": 2e-3})
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 8e-3]


@pytest.mark.parametrize("name, package", [("adamw", None), ("adamw8bit", "bitsandbytes"), ("adafactor", None),
                                           ("lion", "lion_pytorch"), ("adamw_schedulefree", "schedulefree"),
                                           ("torch.optim.SGD", None)])
def test_every_optimizer_moves_b_ratio_times_as_far(name, package):
    """Two equal weights with equal gradients, one an A and one a B: the first update of B is R times A's (each
    optimizer's first step is linear in the rate, weight decay included)."""
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    torch.manual_seed(0)
    start = torch.randn(8, 8) * 0.01  # small: the differences below lose few bits
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer = create_optimizer(name, loraplus_groups([("m.lora_A.w", a), ("m.lora_B.w", b)], 4.0), 1e-3, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 4e-3]
    grad = torch.randn(8, 8)
    a.grad, b.grad = grad.clone(), grad.clone()
    optimizer.step()
    torch.testing.assert_close(b.detach() - start, 4 * (a.detach() - start), rtol=1e-4, atol=1e-9)


def test_a_run_with_loraplus_trains_resumes_exactly_and_refuses_another_ratio(tiny_models, shared, tmp_path, capsys):
    full = assert_resumes_exactly(tiny_models, shared, tmp_path, "--loraplus_lr_ratio", "4")
    state = os.path.join(full, "checkpoints", "step-2")
    with open(os.path.join(state, "optimizer.json")) as f:
        groups = json.load(f)["param_groups"]
    assert [g["lr"] for g in groups] == [2e-3, 8e-3]  # --learning_rate 2e-3, constant schedule
    with open(os.path.join(full, "train_log.csv")) as f:
        assert {r["lr"] for r in csv.DictReader(f)} == {"2.000e-03"}  # the log shows the base rate
    assert "LoRA+: " in capsys.readouterr().out

    data, cache = shared
    argv = flags(tiny_models, data, full, "--dataset_repeat", "2", "--max_steps", "4", "--cache_conditioning", cache,
                 "--resume_from_checkpoint", "latest")
    assert main(argv + ["--loraplus_lr_ratio", "2"]) == 2
    assert "--loraplus_lr_ratio: state 4.0, this run 2.0" in capsys.readouterr().err

    # a state written before the key existed trained with one rate: it resumes without LoRA+, not with it
    assert_older_state_resumes_as(state, "loraplus_lr_ratio", 1.0, 4.0)


def test_loraplus_needs_a_lora(tiny_models, data, tmp_path, capsys):
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--loraplus_lr_ratio", "4")
    at = argv.index("--lora_base_model")
    del argv[at: at + 4]  # and --lora_rank 4: a full fine-tune
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "--loraplus_lr_ratio sets the rate of LoRA's B matrices: it needs --lora_base_model dit" \
        in capsys.readouterr().err


def test_dry_run_shows_the_ratio(tiny_models, data, tmp_path, capsys):
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--dry_run", "--loraplus_lr_ratio", "8")) == 0
    assert json.loads(capsys.readouterr().out)["loraplus_lr_ratio"] == 8.0
