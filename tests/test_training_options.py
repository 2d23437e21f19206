"""Issue 12: optimizers, lr schedules, timestep sampling and weighting, EMA, trackers, --dry_run. Each option is
run on the tiny models (it changes what it should), resumes exactly, and the default run stays today's scheme."""
import csv
import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from diffsynth.trainers import Trainer, main, parse_args
from diffsynth.trainers.checkpoint import StateError, check_setup
from diffsynth.trainers.optim import create_lr_scheduler, create_optimizer, lr_lambda, unwrap_optimizer
from diffsynth.trainers.options import parse_optimizer_args
from diffsynth.trainers.timesteps import TimestepSampling
from test_trainer import flags, losses


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dataset and one conditioning cache for the module: runs differ only in their flags."""
    from diffsynth.utils.demo_data import write_edit_dataset

    root = tmp_path_factory.mktemp("options")
    write_edit_dataset(str(root / "data"), num_samples=2)
    return str(root / "data"), str(root / "cache")


def run(tiny_models, shared, out, *extra, steps=4):
    data, cache = shared
    argv = flags(tiny_models, data, str(out), "--dataset_repeat", "2", "--max_steps", str(steps),
                 "--cache_conditioning", cache, *extra)
    assert main(argv) == 0
    return str(out)


def weights(out, name="checkpoint-final"):
    """The LoRA weights of a checkpoint (without the `.alpha` tensors every native file carries)."""
    return {k: v for k, v in load_file(os.path.join(out, f"{name}.safetensors")).items() if not k.endswith(".alpha")}


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


class Interrupted(Exception):
    pass


def assert_resumes_exactly(tiny_models, shared, tmp_path, *extra, names=("checkpoint-final",)):
    """A run killed right after its step-2 training state and resumed from it ends where the uninterrupted run
    ends (same flags: a decaying lr schedule depends on --max_steps)."""
    full = run(tiny_models, shared, tmp_path / "full", "--save_steps", "2", *extra)
    real = Trainer.save_state

    def save_then_die(self):
        real(self)
        raise Interrupted

    Trainer.save_state = save_then_die
    try:
        with pytest.raises(Interrupted):
            run(tiny_models, shared, tmp_path / "part", "--save_steps", "2", *extra)
    finally:
        Trainer.save_state = real
    part = run(tiny_models, shared, tmp_path / "part", "--save_steps", "2", *extra, "--resume_from_checkpoint",
               "latest")
    for name in names:
        assert_equal_weights(weights(full, name), weights(part, name))
    assert losses(part)[-2:] == losses(full)[-2:]
    return full


def assert_older_state_resumes_as(state, key, before, other):
    """A state written before setup key `key` existed resumes as the value runs had then (`before`), and is refused
    with another (`other`), naming both."""
    with open(os.path.join(state, "state.json")) as f:
        manifest = json.load(f)
    del manifest["setup"][key]
    with open(os.path.join(state, "state.json"), "w") as f:
        json.dump(manifest, f)
    check_setup(state, {key: before})
    with pytest.raises(StateError, match=rf"--{key}: state {before!r}, this run {other!r}"):
        check_setup(state, {key: other})


# ---- the default run is today's scheme -----------------------------------------------------------------------

def todays_loss(dit, scheduler, cond, generator):
    """The trainer's loss before issue 12, verbatim: DiffSynth's sigma draw and bell weight."""
    x0, edit = cond["latents"], cond["edit_latents"]
    batch = x0.shape[0]
    sigma = scheduler.training_sample(batch, generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, sigma.to(x0.device, x0.dtype))
    x = x_t if edit is None else torch.cat([x_t, edit], dim=1)
    pred = dit(x, cond["prompt_emb"], cond["prompt_mask"], sigma.to(x0.device, x0.dtype), [cond["shapes"]] * batch)
    pred = pred[:, : x0.shape[1]]
    target = scheduler.training_target(x0, noise)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
    return (per_sample * scheduler.training_weight(sigma).to(per_sample.device)).mean()


def test_default_run_is_todays_scheme_bit_for_bit(tiny_models, shared, tmp_path):
    """The default flags train exactly what the trainer trained before the new options: a replay with today's
    AdamW, warm-up lambda and loss ends on the same LoRA, bit for bit, with the same logged losses."""
    extra = ["--lr_warmup_steps", "2"]
    out = run(tiny_models, shared, tmp_path / "out", *extra)
    data, cache = shared
    args = parse_args(flags(tiny_models, data, str(tmp_path / "replay"), "--dataset_repeat", "2", "--max_steps",
                            "4", "--cache_conditioning", cache, *extra))
    t = Trainer(args)
    t.setup()
    optimizer = torch.optim.AdamW(t.params, lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = args.lr_warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    replayed = []
    t.sampler.set_epoch(0)
    for i, indices in enumerate(t.sampler.batches()):
        from diffsynth.trainers.dataset import collate_fn

        batch = collate_fn([t.dataset[j] for j in indices])
        t.state.batch_in_epoch = i
        # batch 1: the sample's own generator (the trainer draws each sample's noise from one, issue 11)
        loss = todays_loss(t.dit, t.pipe.scheduler, t.conditions(batch), t.state.sample_generators(batch["position"])[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t.params, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        replayed.append(float(f"{loss.item():.6f}"))
    assert losses(out) == replayed
    from diffsynth.lora import lora_state_dict

    ours = weights(out)
    theirs = lora_state_dict(t.dit)
    assert_equal_weights(ours, {k: v.detach().float() for k, v in theirs.items()})


# ---- optimizers ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adamw_run(tiny_models, shared, tmp_path_factory):
    """The default optimizer's run with the resume tests' flags, for comparison."""
    return run(tiny_models, shared, tmp_path_factory.mktemp("adamw") / "out", "--save_steps", "2")


OPTIMIZER_CASES = [  # flag, extra flags, class it must build, package
    ("adamw8bit", [], "AdamW8bit", "bitsandbytes"),
    ("adafactor", [], "Adafactor", None),
    ("prodigy", ["--learning_rate", "1.0"], "Prodigy", "prodigyopt"),
    ("lion", ["--learning_rate", "3e-4"], "Lion", "lion_pytorch"),
    ("adamw_schedulefree", ["--lr_warmup_steps", "1"], "AdamWScheduleFree", "schedulefree"),
    ("torch.optim.SGD", ["--optimizer_args", "momentum=0.9,nesterov=True"], "SGD", None),
]


@pytest.mark.parametrize("name, extra, cls, package", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_optimizer_trains_and_resumes_exactly(tiny_models, shared, adamw_run, tmp_path, name, extra, cls, package):
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e .[...]; its absence is tested below)")
    data, cache = shared
    args = parse_args(flags(tiny_models, data, str(tmp_path / "probe"), "--cache_conditioning", cache,
                            "--optimizer", name, *extra))
    t = Trainer(args)
    t.setup()
    assert type(unwrap_optimizer(t.optimizer)).__name__ == cls
    full = assert_resumes_exactly(tiny_models, shared, tmp_path, "--optimizer", name, *extra)
    # another optimizer, another LoRA; the loss of step 1 is AdamW's (same weights, noise and data)
    assert any(not torch.equal(a, b) for a, b in zip(weights(full).values(), weights(adamw_run).values()))
    assert losses(full)[0] == losses(adamw_run)[0]


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    """Each optimizer's state_dict is plain tensors and numbers (safetensors + json, no pickle) and loads back
    into a fresh optimizer exactly."""
    from diffsynth.trainers.checkpoint import load_object_state, save_object_state

    names = [c[0] for c in OPTIMIZER_CASES if not c[3] or importlib.util.find_spec(c[3])]
    for name in names:
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(64, 80))]  # > 4096 values: bitsandbytes keeps 8-bit state
        b = [torch.nn.Parameter(a[0].detach().clone())]
        opt_a = create_optimizer(name, a, 1e-3, 0.01, {"momentum": 0.9} if "SGD" in name else {})
        opt_b = create_optimizer(name, b, 1e-3, 0.01, {"momentum": 0.9} if "SGD" in name else {})
        grads = [torch.randn(64, 80, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        for g in grads[:2]:
            a[0].grad = g.clone()
            opt_a.step()
        save_object_state(opt_a.state_dict(), str(tmp_path), name)  # the training state's format
        opt_b.load_state_dict(load_object_state(str(tmp_path), name))
        with torch.no_grad():
            b[0].copy_(a[0])
        for g in grads[2:]:
            a[0].grad, b[0].grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        assert torch.equal(a[0], b[0]), name


def test_missing_optimizer_package_names_the_pip_command(tiny_models, data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--optimizer", "adamw8bit"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizer adamw8bit needs the `bitsandbytes` package" in err and "pip install -e .[bnb]" in err


@pytest.mark.parametrize("bad, message", [
    (["--optimizer", "nosuchmodule.Opt"], "module 'nosuchmodule' is not installed"),
    (["--optimizer", "adam"], "use one of adamw, adamw8bit"),
    (["--optimizer_args", "betas"], "expected key=value"),
    (["--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"], "replaces the lr schedule"),
    (["--optimizer", "schedulefree.SGDScheduleFree", "--lr_scheduler", "linear"],
     "--optimizer schedulefree.SGDScheduleFree replaces the lr schedule"),
    (["--lr_min_ratio", "2"], "--lr_min_ratio must be in [0, 1]"),
    (["--lr_warmup_steps", "1.5"], "argument --lr_warmup_steps: '1.5' is neither a whole number of steps (>= 0) "
                                   "nor a fraction of the run's steps between 0 and 1"),
    (["--lr_warmup_steps", "-2"], "'-2' is neither a whole number of steps"),
    (["--lr_warmup_steps", "ten"], "'ten' is neither a whole number of steps"),
    (["--min_timestep", "600", "--max_timestep", "500"], "must be below --max_timestep"),
    (["--min_timestep", "1000"], "--min_timestep 1000.0 must be below --max_timestep 1000"),  # the default maximum
    (["--max_timestep", "0"], "--min_timestep 0 must be below --max_timestep 0.0"),
    (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1)"),
    (["--report_to", "wandb,comet"], "--report_to comet: choose from"),
    (["--optimizer", "adafactor", "--optimizer_args", "relative_step=True"], "relative_step=True: Adafactor's own"),
    # an option of another schedule or sampler would do nothing
    (["--lr_min_ratio", "0.1"], "--lr_min_ratio 0.1 would do nothing here: it shapes a decaying --lr_scheduler"),
    (["--lr_scheduler", "cosine", "--lr_num_cycles", "3"], "--lr_num_cycles 3 would do nothing here"),
    (["--lr_scheduler", "cosine", "--lr_power", "2"], "--lr_power 2.0 would do nothing here"),
    (["--timestep_sampling", "qwen_shift", "--discrete_flow_shift", "5"], "--discrete_flow_shift 5.0 would do nothing"),
    (["--timestep_sampling", "uniform", "--logit_std", "0.5"], "--logit_std 0.5 would do nothing here"),
    (["--tracker_project_name", "mine"], "--tracker_project_name mine would do nothing: it names the project of"),
    (["--report_to", "csv", "--tracker_project_name", "mine"], "--tracker_project_name mine would do nothing"),
    # LoRA+ and network dropout that cannot work
    (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be > 0 (got 0.0); 1 turns LoRA+ off"),
    (["--loraplus_lr_ratio", "nan"], "--loraplus_lr_ratio must be > 0 (got nan)"),
    (["--loraplus_lr_ratio", "4", "--lora_type", "loha"], "--loraplus_lr_ratio: a loha has no B (up) matrix"),
    (["--loraplus_lr_ratio", "4", "--lora_type", "lokr"], "--loraplus_lr_ratio: a lokr has no B (up) matrix"),
    (["--loraplus_lr_ratio", "4", "--optimizer", "prodigy"], "--optimizer prodigy takes one rate for all parameters"),
    (["--loraplus_lr_ratio", "4", "--optimizer", "prodigyopt.Prodigy"], "--optimizer prodigyopt.Prodigy takes one"),
    (["--network_dropout", "1"], "--network_dropout must be in [0, 1) (got 1.0)"),
    (["--network_dropout", "-0.1"], "--network_dropout must be in [0, 1) (got -0.1)"),
    (["--network_dropout", "nan"], "--network_dropout must be in [0, 1) (got nan)"),
    (["--network_dropout", "0.1", "--lora_type", "loha"], "--network_dropout is implemented for --lora_type lora only, "
                                                         "not loha"),
    (["--network_dropout", "0.1", "--lora_type", "lokr"], "--lora_type lora only, not lokr"),
    (["--network_dropout", "0.1", "--lora_type", "dora"], "--lora_type lora only, not dora"),
])
def test_bad_option_flags(tiny_models, data, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), *bad))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_an_import_path_that_is_no_optimizer_stops_before_models_load(tiny_models, data, tmp_path, capsys):
    code = main(flags(tiny_models, data, str(tmp_path / "out"), "--optimizer", "torch.nn.Linear",
                      "--models_dir", str(tmp_path / "nothing-here")))
    assert code == 2  # a user-fixable error
    assert "torch.nn.Linear is not a torch.optim.Optimizer subclass" in capsys.readouterr().err


def test_an_optimizer_that_needs_a_closure_stops_before_models_load(tiny_models, data, tmp_path, capsys):
    code = main(flags(tiny_models, data, str(tmp_path / "out"), "--optimizer", "torch.optim.LBFGS",
                      "--models_dir", str(tmp_path / "nothing-here")))
    assert code == 2
    assert "torch.optim.LBFGS.step needs a closure" in capsys.readouterr().err


def test_optimizer_args_are_typed():
    assert parse_optimizer_args(["betas=(0.9,0.99),eps=1e-8", "decouple=True", "d_coef=2", "name=x,y=None"]) == {
        "betas": (0.9, 0.99), "eps": 1e-8, "decouple": True, "d_coef": 2, "name": "x", "y": None}


def test_optimizer_args_take_musubis_bare_comma_lists():
    """musubi-tuner's `betas=0.9,0.999` is the tuple that `betas=(0.9,0.999)` writes; a part without `key=` continues
    the value before it, within one argument."""
    assert parse_optimizer_args(["betas=0.9,0.999"]) == parse_optimizer_args(["betas=(0.9,0.999)"]) == {
        "betas": (0.9, 0.999)}
    assert parse_optimizer_args(["betas=0.9, 0.999,eps=1e-8", "d_coef=2"]) == {
        "betas": (0.9, 0.999), "eps": 1e-8, "d_coef": 2}
    assert parse_optimizer_args(["names='a','b'", "name=x"]) == {"names": ("a", "b"), "name": "x"}


@pytest.mark.parametrize("bad, message", [
    # a comma list is literals only: text in it would be a guess at what was meant
    (["betas=0.9,abc"], "--optimizer_args betas=0.9,abc: a comma list must be Python literals"),
    (["0.9,betas=0.999"], "--optimizer_args '0.9': expected key=value"),  # nothing before it to continue
    (["betas=0.9", "0.999"], "--optimizer_args '0.999': expected key=value"),  # another argument: no continuation
    # kept as text, these failed only in the optimizer, after the models loaded: two pairs in one quoted argument,
    # a stray bracket (it hid the comma after it)
    (["betas=0.9,0.999 eps=1e-8"], "betas=... and eps=... are two arguments: separate them with a space outside"),
    (["lr=1e-3 weight_decay=0.1"], "--optimizer_args lr=1e-3 weight_decay=0.1: not a Python literal"),
    (["betas=(0.9,0.99)),eps=1e-8"], "betas=(0.9,0.99)),eps=1e-8: not a Python literal (numbers, True/False/None, "
                                     "quoted strings, tuples), e.g. betas=0.9,0.999; check its brackets and quotes"),
])
def test_malformed_optimizer_args_are_refused(tiny_models, data, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--optimizer_args", *bad))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ---- lr schedules --------------------------------------------------------------------------------------------

def test_lr_schedules():
    total, warm = 10, 2
    constant = lr_lambda("constant", warm, total)
    assert [constant(s) for s in range(total)] == [min(1.0, (s + 1) / warm) for s in range(total)]  # today's rule
    assert [lr_lambda("constant", 0, total)(s) for s in range(3)] == [1.0, 1.0, 1.0]
    for name in ("linear", "cosine", "polynomial", "cosine_with_restarts"):
        f = lr_lambda(name, warm, total, min_ratio=0.1, num_cycles=2, power=2.0)
        assert [f(0), f(1)] == [0.5, 1.0]  # warm-up, then the peak at the first decaying step
        assert f(total) == pytest.approx(0.1)
        assert all(0.1 - 1e-12 <= f(s) <= 1.0 for s in range(total + 1))
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("polynomial", 0, 10, power=2.0)(5) == pytest.approx(0.25)
    restarts = lr_lambda("cosine_with_restarts", 0, 10, num_cycles=2)
    assert restarts(5) == pytest.approx(1.0) and restarts(4) < 0.5  # restarts at the half
    # the schedule's state is plain numbers: nothing of the lambda is saved
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    state = create_lr_scheduler(opt, "cosine", 1, 10).state_dict()
    assert state["lr_lambdas"] == [None]


def test_max_steps_alone_sets_the_length(tiny_models, shared, tmp_path, capsys):
    """--max_steps without --num_epochs runs all its steps (4 per epoch here: two epochs, the second cut short), as
    diffusers' and kohya's --max_train_steps do; with --num_epochs, whichever ends first, and the run says so."""
    assert len(losses(run(tiny_models, shared, tmp_path / "steps", steps=6))) == 6
    assert len(losses(run(tiny_models, shared, tmp_path / "epochs", "--num_epochs", "1", steps=6))) == 4
    # a run counted in steps saves by --save_steps, not at the end of each pass
    assert not os.path.exists(tmp_path / "steps" / "epoch-1.safetensors")
    assert os.path.exists(tmp_path / "epochs" / "epoch-1.safetensors")
    assert "--num_epochs 1 ends this run after 4 steps, before --max_steps 6" in capsys.readouterr().out


@pytest.mark.parametrize("every, saved", [("2", ["epoch-2"]), ("0", [])])
def test_save_every_n_epochs_writes_only_those_epochs(tiny_models, shared, tmp_path, every, saved):
    """3 epochs of 2 steps: --save_every_n_epochs 2 writes epoch-2 (with its standard copy) and not epoch-1 or
    epoch-3; 0 writes no epoch file; checkpoint-final is always written."""
    out = run(tiny_models, shared, tmp_path / "out", "--batch_size", "2", "--num_epochs", "3",
              "--save_every_n_epochs", every, steps=6)
    assert len(losses(out)) == 6
    epochs = sorted(f for f in os.listdir(out) if f.startswith("epoch-"))
    assert epochs == sorted(f"{name}{s}.safetensors" for name in saved for s in ("", "-standard"))
    assert os.path.exists(os.path.join(out, "checkpoint-final.safetensors"))


def test_save_precision_writes_the_trained_weights_rounded(tiny_models, shared, tmp_path):
    """--save_precision bf16: the LoRA and its standard copy hold the fp32 run's weights rounded to bf16 (training is
    the same: the states keep fp32) and give the same deltas within bf16's rounding; fp16 refuses to write inf."""
    from types import SimpleNamespace

    from diffsynth.lora import lora_deltas

    full = run(tiny_models, shared, tmp_path / "fp32", steps=2)
    half = run(tiny_models, shared, tmp_path / "bf16", "--save_precision", "bf16", steps=2)
    assert losses(half) == losses(full)
    for name in ("checkpoint-final.safetensors", "checkpoint-final-standard.safetensors"):
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(half, name))
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith(".alpha"):
                assert torch.equal(a[k], b[k])
            else:
                assert a[k].dtype == torch.float32 and b[k].dtype == torch.bfloat16
                assert torch.equal(a[k].to(torch.bfloat16), b[k]), k
    assert os.path.getsize(os.path.join(half, "checkpoint-final.safetensors")) < \
        0.6 * os.path.getsize(os.path.join(full, "checkpoint-final.safetensors"))
    trainer = SimpleNamespace(args=SimpleNamespace(save_precision="fp16"))
    with pytest.raises(ValueError, match=r"--save_precision fp16: x.lora_A.weight of step-3 holds values up to "
                                         r"1e\+06, beyond the dtype's range; save in bf16 or fp32"):
        Trainer._in_save_precision(trainer, {"x.lora_A.weight": torch.tensor([1.0, -1e6])}, torch.float32, "step-3")
    # what the loaders compute from it: the same deltas within bf16's rounding
    for name in ("checkpoint-final.safetensors", "checkpoint-final-standard.safetensors"):
        a, b = lora_deltas(os.path.join(full, name)), lora_deltas(os.path.join(half, name))
        assert a.keys() == b.keys() and all((a[k] - b[k]).norm() <= 0.01 * a[k].norm() for k in a)


def test_save_every_n_epochs_beyond_the_runs_last_epoch_is_refused_before_loading(tiny_models, shared, tmp_path,
                                                                                   capsys):
    """3 epochs of 2 steps cut by --max_steps 5 complete 2: an epoch file every 3 would never be written (the flag
    check cannot know the steps per epoch; the trainer knows them from the data, before any model loads)."""
    data, cache = shared
    argv = flags(tiny_models, data, str(tmp_path / "out"), "--dataset_repeat", "2", "--batch_size", "2",
                 "--num_epochs", "3", "--max_steps", "5", "--save_every_n_epochs", "3", "--cache_conditioning", cache,
                 "--models_dir", str(tmp_path / "no-models"))
    assert main(argv) == 2
    assert "--save_every_n_epochs 3 would write no epoch file: this run completes 2 epoch(s) (2 steps each, " \
           "--max_steps 5); give a smaller N, or leave it out" in capsys.readouterr().err


def test_cosine_schedule_is_logged_per_optimizer_step(tiny_models, shared, tmp_path):
    out = run(tiny_models, shared, tmp_path / "out", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
              "--lr_min_ratio", "0.1", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2",
              "--dataset_repeat", "4", steps=4)
    with open(os.path.join(out, "train_log.csv")) as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    f = lr_lambda("cosine", 1, 4, 0.1)
    assert lrs == pytest.approx([1e-3 * f(s) for s in range(4)], rel=1e-3)


# ---- timesteps -----------------------------------------------------------------------------------------------

def test_timestep_samplers_and_weights():
    from diffsynth.schedulers import FlowMatchScheduler

    s = FlowMatchScheduler()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # the default is the scheduler's own scheme, draw for draw
    assert torch.equal(TimestepSampling().sample(s, 512, g()), s.training_sample(512, generator=g()))
    sigma = torch.linspace(0.01, 0.99, 99)
    assert torch.equal(TimestepSampling().weight(s, sigma), s.training_weight(sigma))
    n = 200_000
    uniform = TimestepSampling("uniform").sample(s, n, g())
    assert abs(uniform.mean().item() - 0.5) < 0.01 and uniform.min() >= 0 and uniform.max() <= 1
    logit = TimestepSampling("logit_normal", logit_mean=1.0, logit_std=0.5).sample(s, n, g())
    assert abs(torch.log(logit / (1 - logit)).mean().item() - 1.0) < 0.01
    assert abs(torch.log(logit / (1 - logit)).std().item() - 0.5) < 0.01
    # shift 3: t -> 3t / (1 + 2t) of the logit-normal draw; qwen_shift: the same with the pipeline's exp(mu)
    base = TimestepSampling("logit_normal").sample(s, 1000, g()).double()
    shifted = TimestepSampling("shift", shift=3.0).sample(s, 1000, g())
    torch.testing.assert_close(shifted, (3 * base / (1 + 2 * base)).float())
    for tokens in (256, 4096):
        q = TimestepSampling("qwen_shift").sample(s, 1000, g(), image_seq_len=tokens)
        k = math.exp(s.calculate_shift(tokens))
        torch.testing.assert_close(q, (k * base / (1 + (k - 1) * base)).float())
    # more target tokens: noisier draws, as the inference schedule shifts more at higher resolution
    assert TimestepSampling("qwen_shift").sample(s, n, g(), 4096).mean() > \
        TimestepSampling("qwen_shift").sample(s, n, g(), 256).mean()
    bounded = TimestepSampling("uniform", min_timestep=200, max_timestep=400).sample(s, n, g())
    assert bounded.min() >= 0.2 and bounded.max() <= 0.4
    torch.testing.assert_close(bounded, (0.2 + 0.2 * uniform.double()).float())
    # weights: none is 1; the logit-normal density has mean 1 over U(0, 1) and peaks at sigmoid(mean)
    assert torch.equal(TimestepSampling(weighting="none").weight(s, sigma), torch.ones(99))
    density = TimestepSampling(weighting="logit_normal").weight(s, uniform)
    assert abs(density.mean().item() - 1.0) < 0.02
    w = TimestepSampling(weighting="logit_normal").weight(s, sigma)
    assert sigma[w.argmax()].item() == pytest.approx(0.5, abs=0.011)


@pytest.mark.parametrize("sampling, weighting", [("uniform", "none"), ("logit_normal", "logit_normal"),
                                                 ("shift", "bell"), ("qwen_shift", "none")])
def test_timestep_options_change_the_losses_not_the_data(tiny_models, shared, tmp_path, sampling, weighting):
    base = losses(run(tiny_models, shared, tmp_path / "base", steps=2))
    out = run(tiny_models, shared, tmp_path / "out", "--timestep_sampling", sampling, "--weighting_scheme",
              weighting, steps=2)
    assert losses(out) != base and all(math.isfinite(v) for v in losses(out))


# ---- EMA -----------------------------------------------------------------------------------------------------

def test_ema_is_the_moving_average_of_the_saved_weights(tiny_models, shared, tmp_path):
    decay = 0.5
    out = run(tiny_models, shared, tmp_path / "out", "--ema_decay", str(decay), "--save_steps", "1",
              "--learning_rate", "1e-2", "--num_epochs", "1")  # an epoch-1 checkpoint too
    names = sorted(os.listdir(out))
    for step in (1, 2, 3, 4):
        assert f"step-{step}.safetensors" in names and f"step-{step}-ema.safetensors" in names
    assert "checkpoint-final-ema.safetensors" in names and "epoch-1-ema.safetensors" in names
    # diffusers' EMAModel: the first update copies, then decay min(decay, (1 + n) / (10 + n)) for update n + 1
    shadow = None
    for step in (1, 2, 3, 4):
        raw = weights(out, f"step-{step}")
        if shadow is None:
            shadow = {k: v.clone() for k, v in raw.items()}
        else:
            d = min(decay, (1 + step - 1) / (10 + step - 1))
            for k in shadow:
                shadow[k].sub_((1 - d) * (shadow[k] - raw[k]))
        ema = weights(out, f"step-{step}-ema")
        for k in shadow:
            torch.testing.assert_close(ema[k], shadow[k], rtol=0, atol=1e-7)
    assert any(not torch.equal(weights(out, "step-4-ema")[k], weights(out, "step-4")[k]) for k in shadow)
    # the EMA file is a LoRA like the checkpoint: same keys, same metadata, loads into the pipeline
    from safetensors import safe_open

    with safe_open(os.path.join(out, "step-4-ema.safetensors"), "pt") as f:
        assert f.metadata()["architecture"] == "merged_qkv" and f.metadata()["steps"] == "4"


def test_options_together_resume_exactly(tiny_models, shared, tmp_path):
    assert_resumes_exactly(tiny_models, shared, tmp_path, "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles",
                           "2", "--lr_warmup_steps", "1", "--lr_min_ratio", "0.1", "--timestep_sampling",
                           "qwen_shift", "--weighting_scheme", "logit_normal", "--min_timestep", "50",
                           "--ema_decay", "0.8", "--edit_plus", "--caption_dropout_rate", "0.5",
                           names=("checkpoint-final", "checkpoint-final-ema"))


@pytest.mark.parametrize("extra, said", [
    # the seed shuffles each epoch: resumed with another, the run would skip batches of another order
    (["--seed", "5"], "--seed: state 0, this run 5"),
    # the optimizer's state restores these: the run would keep the state's values, saying nothing
    (["--learning_rate", "1e-5"], "--learning_rate: state 0.002, this run 1e-05"),
    (["--weight_decay", "0.5"], "--weight_decay: state 0.01, this run 0.5"),
    (["--optimizer_args", "betas=(0.5,0.6)"], "--optimizer_args: state '{}', this run '{\"betas\": [0.5, 0.6]}'"),
    # the optimizer's groups: one rate there, two here
    (["--loraplus_lr_ratio", "4"], "--loraplus_lr_ratio: state 1.0, this run 4.0"),
])
def test_resume_with_other_settings_is_refused(tiny_models, shared, tmp_path, capsys, extra, said):
    out = run(tiny_models, shared, tmp_path / "out", "--save_steps", "2", "--num_epochs", "1", steps=2)
    data, cache = shared
    argv = flags(tiny_models, data, out, "--dataset_repeat", "2", "--cache_conditioning", cache,
                 "--resume_from_checkpoint", "latest", *extra)
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_fp16_overflow_skips_the_update_and_resumes_exactly(tiny_models, shared, tmp_path, monkeypatch, capsys):
    """--mixed_precision fp16 on a GPU: accelerate's GradScaler overflows the gradients in the first steps and skips
    those updates while it lowers its scale. The run goes on (it stopped with 'the gradient norm is nan'), and the
    scale is part of the training state. On the CPU accelerate makes no scaler: the test gives the run one."""
    real = Trainer.setup

    def setup_with_scaler(self):
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -8)
        real(self)

    monkeypatch.setattr(Trainer, "setup", setup_with_scaler)
    assert_resumes_exactly(tiny_models, shared, tmp_path, "--mixed_precision", "fp16")
    assert "step 3: fp16 gradients overflowed at loss scale 1.67772e+07; the update is skipped" in capsys.readouterr().out


@pytest.mark.parametrize("fp8", ["--enable_fp8_training", "--fp8_compute"])
def test_fp8_runs_resume_exactly(tiny_models, shared, tmp_path, fp8):
    """The training state holds the trained weights only, not the fp8 scales of the frozen layers (which made the
    resume refuse the state as another setup's)."""
    assert_resumes_exactly(tiny_models, shared, tmp_path, fp8)
    assert not [k for k in load_file(str(tmp_path / "full" / "checkpoints" / "step-2" / "model.safetensors"))
                if k.endswith("weight_scale")]


# ---- trackers and --dry_run ----------------------------------------------------------------------------------

def test_trackers_offline(tiny_models, shared, tmp_path, monkeypatch):
    present = [t for t in ("tensorboard", "wandb", "swanlab") if importlib.util.find_spec(t)]
    if not present:
        pytest.skip("no tracker package installed (pip install -e .[wandb] / .[swanlab] / tensorboard)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_MODE", "local")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(tiny_models, shared, tmp_path / "out", "--report_to", ",".join(present), "--report_to", "csv",
              "--tracker_project_name", "options-test", steps=2)
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    if "tensorboard" in present:
        assert any("/tensorboard/options-test/events." in f for f in files)
    if "wandb" in present:
        assert any(f.endswith(".wandb") and "/wandb/offline-run-" in f for f in files)
    if "swanlab" in present:
        assert any("/swanlog/" in f for f in files)
    assert len(losses(out)) == 2


def test_missing_tracker_package_names_the_pip_command(tiny_models, data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--report_to", "wandb"))
    assert "--report_to wandb needs the `wandb` package, which is not installed: pip install -e .[wandb]" \
        in capsys.readouterr().err


def test_dry_run_prints_the_resolved_options(tiny_models, data, tmp_path, capsys, monkeypatch):
    # a tracker whose package is present here (tensorboard is in the test extra; faked present otherwise)
    tracker = "tensorboard"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == tracker else real(name, *a))
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--dry_run", "--optimizer", "adafactor",
                      "--optimizer_args", "beta1=0.9,clip_threshold=1.0", "--report_to", f"csv,{tracker}",
                      "--lr_scheduler", "polynomial", "--ema_decay", "0.99", "--timestep_sampling", "shift")) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["optimizer"] == "adafactor"
    assert settings["optimizer_args"] == {"beta1": 0.9, "clip_threshold": 1.0}
    assert settings["report_to"] == ["csv", tracker]
    assert (settings["lr_scheduler"], settings["ema_decay"], settings["timestep_sampling"],
            settings["weighting_scheme"], settings["discrete_flow_shift"]) == ("polynomial", 0.99, "shift", "bell", 3.0)


def test_timestep_plot_script_and_the_plot_in_the_docs(tmp_path):
    from conftest import load_script

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = load_script(os.path.join(root, "docs", "plot_timestep_sampling.py"), "plot_timestep_sampling")
    path = script.plot(str(tmp_path / "plot.png"), draws=2000)
    from PIL import Image

    assert Image.open(path).size == (800, 288)
    kept = os.path.join(root, "docs", "timestep_sampling.png")
    assert Image.open(kept).size == (800, 288) and os.path.getsize(kept) < 100_000
