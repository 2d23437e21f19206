"""The shell recipes, the accelerate configs and every command in QUICKSTART.md and README_MERGED_QKV.md.

A renamed or dropped flag, a moved script or a broken config fails here. Training commands run with `--dry_run`
(flags checked, settings resolved, nothing loaded); other scripts are checked against their `--help`.
"""
import importlib.util
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINING = "examples/qwen_image/model_training"
MERGED_RECIPE = f"{TRAINING}/lora/Qwen-Image-Edit-Ghost-qkv-merged-efficient.sh"
STANDARD_RECIPE = f"{TRAINING}/lora/Qwen-Image-Edit.sh"
TRAIN_SCRIPTS = {f"{TRAINING}/train_merged_qkv.py": True, f"{TRAINING}/train.py": False}
DOCS = ("QUICKSTART.md", "README_MERGED_QKV.md", "README.md")

MERGED_TARGETS = "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2"
STANDARD_TARGETS = ("to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.0.proj,"
                    "img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2")
# The quickstart's "Option 2" command (../shared/spec/merged-qkv-quickstart.md), value by value.
OPTION_2 = {
    "dataset_base_path": "data/", "dataset_metadata_path": "data/metadata.csv", "data_file_keys": "image,edit_image",
    "extra_inputs": "edit_image", "max_pixels": 1048576, "dataset_repeat": 2,
    "model_id_with_origin_paths": "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,"
                                  "Qwen/Qwen-Image:text_encoder/model*.safetensors,"
                                  "Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors",
    "learning_rate": 1e-4, "num_epochs": 5, "output_path": "./models/my_merged_qkv_lora", "lora_base_model": "dit",
    "lora_target_modules": MERGED_TARGETS, "lora_rank": 32, "use_gradient_checkpointing": True,
    "dataset_num_workers": 8, "merged_qkv": True,
}


# ---- reading recipes and docs -------------------------------------------------------------------------------

def recipe_command(recipe):
    """(training script, its arguments) as written in a recipe, without the appended "$@"."""
    text = (ROOT / recipe).read_text()
    script = re.search(r"^SCRIPT=(\S+)$", text, re.M).group(1)
    body = re.search(r'^"\$\{LAUNCH\[@\]\}" "\$SCRIPT" (.*)"\$@"\s*\Z', text, re.S | re.M)
    assert body, f'{recipe}: expected the trainer command to end with "$@" (users append flags)'
    return script, shlex.split(body.group(1).replace("\\\n", " "))


def doc_commands(doc):
    """Every command line in the ```bash blocks of a doc, as tokens (continuations joined, comments dropped)."""
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def parse_command(tokens):
    """Tokens -> (kind, env, target, args); kind: recipe, train, script, module, make, flags or other."""
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        name, _, value = tokens[0].partition("=")
        env[name], tokens = value, tokens[1:]
    head = tokens[0]
    if head == "bash":
        return "recipe", env, tokens[1], tokens[2:]
    if head.startswith("--"):
        return "flags", env, None, tokens
    if tokens[:2] == ["accelerate", "launch"] or head in ("python", "python3"):
        if tokens[1] == "-m":
            return "module", env, tokens[2], tokens[3:]
        i = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        kind = "train" if tokens[i] in TRAIN_SCRIPTS else "script"
        return kind, env, tokens[i], tokens[i + 1:]
    if head == "make":
        return "make", env, tokens[1], tokens[2:]
    return "other", env, head, tokens[1:]


def given_flags(args):
    """{flag: value} as argparse sees them (the last value wins; a flag without a value is True)."""
    given, i = {}, 0
    while i < len(args):
        name, eq, value = args[i][2:].partition("=")
        if eq:
            given[name], i = value, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            given[name], i = args[i + 1], i + 2
        else:
            given[name], i = True, i + 1
    return given


def assert_resolved(args, resolved, where):
    """Every flag of a command is in the trainer's resolved settings with the value the command gave."""
    for name, value in given_flags(args).items():
        got = resolved[name]
        if isinstance(got, bool) or value is True:
            ok = got is True
        elif isinstance(got, (int, float)):
            ok = float(value) == got
        elif isinstance(got, list):
            ok = value in got
        else:
            ok = got == value
        assert ok, f"{where}: --{name} {value!r} resolved to {got!r}"


@pytest.fixture(autouse=True)
def doc_world(tmp_path, monkeypatch):
    """The files the documented commands name, in a scratch working directory: `data/` with a small dataset and
    the LoRAs passed to --lora_fused / --lora_checkpoint (a dry run checks that they exist and are LoRAs)."""
    import torch

    from diffsynth.lora.inject import matches_target
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.models.qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV
    from diffsynth.trainers.args import build_parser
    from diffsynth.utils.demo_data import write_edit_dataset
    from diffsynth.utils.io import save_safetensors

    monkeypatch.chdir(tmp_path)
    write_edit_dataset("data", num_samples=2)
    for doc in DOCS:
        for tokens in doc_commands(doc):
            given = given_flags(tokens)
            rank = int(given.get("lora_rank", 32))  # the recipes' rank: a --lora_checkpoint must have the run's
            lora = {}  # and the modules of its targets (the recipes' defaults unless the command names them)
            merged = any("merged" in t for t in tokens)
            targets = given.get("lora_target_modules") or build_parser(merged).get_default("lora_target_modules")
            with torch.device("meta"):  # the Qwen-Image DiT's shapes (a --lora_fused is checked against them)
                block = (QwenImageDiTMergedQKV if merged else QwenImageDiT)(num_layers=1).transformer_blocks[0]
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and any(matches_target(name, t) for t in targets.split(",")):
                    lora[f"transformer_blocks.0.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
                    lora[f"transformer_blocks.0.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
            for flag, value in given.items():
                if flag in ("lora_fused", "lora_checkpoint") and not os.path.exists(value):
                    save_safetensors(lora, value)
    return tmp_path


def dry_run(script, args, monkeypatch, capsys):
    """Run a training script in-process with --dry_run (in doc_world's directory); its resolved settings."""
    monkeypatch.setattr(sys, "argv", [script, *args, "--dry_run"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr()
    assert exited.value.code == 0, f"{script} {shlex.join(args)} --dry_run exited {exited.value.code}:\n{out.err}"
    return json.loads(out.out)


def script_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr()
    assert exited.value.code == 0, f"{script} --help exited {exited.value.code}:\n{out.err}"
    return out.out


# ---- the recipes through bash and accelerate ----------------------------------------------------------------

def test_recipes_run_through_bash_and_accelerate(tmp_path, monkeypatch, capsys):
    # the recipes run from the repository root, where data/ is the user's: point them at doc_world's
    data = [f"--dataset_base_path={tmp_path}/data", f"--dataset_metadata_path={tmp_path}/data/metadata.csv"]
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "accelerate").exists(), f"accelerate is not installed next to {sys.executable}"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "ACCELERATE_USE_CPU": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}  # HF_HOME: no user accelerate config
    env.pop("ACCELERATE_CONFIG", None)
    runs = {  # each launch spends seconds importing: start them all, then check
        "merged": (env, [MERGED_RECIPE, *data, "--dry_run"]),
        "standard": ({**env, "ACCELERATE_CONFIG": f"{TRAINING}/accelerate_config_1gpu.yaml"},
                     [STANDARD_RECIPE, "--num_epochs", "1", *data, "--dry_run"]),
        "bad_config": ({**env, "ACCELERATE_CONFIG": str(tmp_path / "missing.yaml")}, [MERGED_RECIPE, "--dry_run"]),
        "deepspeed": ({**env, "ACCELERATE_CONFIG": f"{TRAINING}/accelerate_config_deepspeed_zero2.yaml"},
                      [MERGED_RECIPE, *data, "--dry_run"]),
    }
    procs = {name: subprocess.Popen(["bash", *argv], cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (run_env, argv) in runs.items()}
    # Meanwhile: the quickstart's Option 2, in-process.
    option_2 = next(args for kind, _, script, args in map(parse_command, doc_commands("QUICKSTART.md"))
                    if kind == "train" and given_flags(args).get("output_path") == OPTION_2["output_path"])
    assert {k: v for k, v in dry_run(f"{TRAINING}/train_merged_qkv.py", option_2, monkeypatch, capsys).items()
            if k in OPTION_2} == OPTION_2
    expected = dry_run(f"{TRAINING}/train_merged_qkv.py", option_2 + data, monkeypatch, capsys)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (proc.returncode, out, err)

    rc, out, err = results["merged"]
    assert rc == 0, err
    merged = json.loads(out)
    assert merged == expected, "the merged recipe differs from QUICKSTART.md's Option 2"

    rc, out, err = results["standard"]
    assert rc == 0, err
    standard = json.loads(out)
    assert standard["merged_qkv"] is False and standard["lora_target_modules"] == STANDARD_TARGETS
    assert standard["num_epochs"] == 1  # the appended flag overrides the recipe's 5
    same = {k: v for k, v in merged.items() if k not in ("merged_qkv", "lora_target_modules", "output_path", "num_epochs")}
    assert {k: standard[k] for k in same} == same

    rc, _, err = results["bad_config"]  # one line from the recipe, before accelerate starts
    assert rc == 2 and err.strip() == f"error: ACCELERATE_CONFIG={tmp_path / 'missing.yaml'}: no such file"

    rc, _, err = results["deepspeed"]
    if importlib.util.find_spec("deepspeed") is None:  # accelerate would stop with its ImportError traceback
        assert rc == 2 and "uses DeepSpeed, which is not installed: pip install deepspeed" in err, err
        assert "Traceback" not in err


def test_recipe_finds_the_project_venv_without_activation(tmp_path):
    """After `make demo` nothing is activated: the recipe takes accelerate from the venv (VENV, default ./.venv)."""
    venv = Path(sys.executable).parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    data = [f"--dataset_base_path={tmp_path}/data", f"--dataset_metadata_path={tmp_path}/data/metadata.csv"]
    ok = subprocess.run(["bash", str(ROOT / MERGED_RECIPE), *data, "--dry_run"], cwd=ROOT, capture_output=True,
                        text=True, timeout=180, env={**env, "VENV": str(venv)})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["merged_qkv"] is True
    # a bad flag through the recipe: the trainer's one line; accelerate (--quiet) adds no traceback of its own
    bad = subprocess.run(["bash", str(ROOT / MERGED_RECIPE), *data, "--blocks_to_checkpoint", "half", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180, env={**env, "VENV": str(venv)})
    assert bad.returncode == 1 and "error: --blocks_to_checkpoint 'half': give a number of blocks, or auto" in bad.stderr
    assert "Traceback" not in bad.stderr and "usage:" not in bad.stderr, bad.stderr
    missing = subprocess.run(["bash", str(ROOT / MERGED_RECIPE), "--dry_run"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, env={**env, "VENV": str(tmp_path / "no-venv")})
    assert missing.returncode == 1 and "accelerate not found. Activate the project's venv" in missing.stderr


def test_recipe_outside_the_repo_root_says_where_to_run(tmp_path):
    result = subprocess.run(["bash", str(ROOT / MERGED_RECIPE), "--dry_run"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "run this recipe from the repository root" in result.stderr


@pytest.mark.parametrize("recipe", [MERGED_RECIPE, STANDARD_RECIPE])
def test_recipe_is_strict_bash_and_matches_its_script(recipe, monkeypatch, capsys):
    text = (ROOT / recipe).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    script, args = recipe_command(recipe)
    resolved = dry_run(script, args, monkeypatch, capsys)
    assert_resolved(args, resolved, recipe)
    merged = recipe == MERGED_RECIPE
    assert resolved["merged_qkv"] is merged
    assert resolved["lora_target_modules"] == (MERGED_TARGETS if merged else STANDARD_TARGETS)
    assert (resolved["lora_rank"], resolved["max_pixels"], resolved["dataset_repeat"]) == (32, 1048576, 2)


# ---- the docs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS)
def test_every_training_command_in_the_docs_runs(doc, monkeypatch, capsys):
    """Training commands and recipe calls (with their extra flags) pass --dry_run with the values they give."""
    checked = 0
    for kind, env, target, args in map(parse_command, doc_commands(doc)):
        if "ACCELERATE_CONFIG" in env:
            assert (ROOT / env["ACCELERATE_CONFIG"]).is_file(), f"{doc}: no {env['ACCELERATE_CONFIG']}"
        if kind == "recipe":
            assert (ROOT / target).is_file(), f"{doc}: no recipe {target}"
            script, recipe_args = recipe_command(target)
            args = recipe_args + args
        elif kind == "train":
            script = target
        else:
            continue
        resolved = dry_run(script, args, monkeypatch, capsys)
        assert_resolved(args, resolved, f"{doc}: {shlex.join([target, *args])}")
        assert resolved["merged_qkv"] is TRAIN_SCRIPTS[script]
        checked += 1
    assert checked >= (5 if doc == "QUICKSTART.md" else 1), f"{doc}: too few training commands found ({checked})"


@pytest.mark.parametrize("doc", DOCS)
def test_other_commands_in_the_docs_exist(doc, monkeypatch, capsys):
    """Scripts exist and know every flag used with them; flag fragments are trainer flags; make targets exist."""
    from diffsynth.trainers.args import build_parser

    trainer_flags = set(build_parser(True)._option_string_actions)
    makefile = (ROOT / "Makefile").read_text()
    helps = {}
    for kind, _, target, args in map(parse_command, doc_commands(doc)):
        if kind == "script":
            assert (ROOT / target).is_file(), f"{doc}: {target} does not exist"
            if target not in helps:
                helps[target] = script_help(target, monkeypatch, capsys)
            for flag in given_flags(args):
                assert re.search(rf"--{flag}\b", helps[target]), f"{doc}: {target} has no --{flag}"
        elif kind == "flags":
            unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in trainer_flags]
            assert not unknown, f"{doc}: {unknown} are not trainer flags"
        elif kind == "module":
            assert importlib.util.find_spec(target), f"{doc}: no module {target}"
        elif kind == "make":
            assert re.search(rf"^{target}:", makefile, re.M), f"{doc}: the Makefile has no {target!r} target"


@pytest.mark.parametrize("doc", DOCS)
def test_repository_paths_named_in_the_docs_exist(doc):
    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"\b(?:examples|diffsynth|benchmarks|tests)/[\w./-]*\w\.(?:py|sh|yaml|md)\b", text))
    assert paths, f"{doc} names no repository files"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("script", ["examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py",
                                    "examples/qwen_image/model_training/utils/convert_merged_qkv_checkpoint.py",
                                    "examples/qwen_image/model_training/utils/folders_to_metadata.py"])
def test_help_example_keeps_its_line_breaks(script, monkeypatch, capsys):
    """The example command in --help is printed as written, one ' \\'-continued line per row: a bare backslash in
    the docstring joined it into one line with a run of spaces."""
    text = script_help(script, monkeypatch, capsys)
    lines = [line for line in text.splitlines() if line.lstrip().startswith("python examples/")]
    assert lines, f"{script} --help shows no example command"
    for line in lines:
        assert line.endswith(" \\") and not re.search(r"\S {2,}--", line), f"{script} --help: {line!r}"


def test_inference_help_states_the_defaults_it_applies(monkeypatch, capsys):
    """--output and --seed have defaults the run uses without being asked; --help says them."""
    script = "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py"
    text = " ".join(script_help(script, monkeypatch, capsys).split())
    args = runpy.run_path(str(ROOT / script))["parse_args"](["--prompt", "p", "--edit_image", "e.png"])
    for flag in ("output", "seed"):
        default = getattr(args, flag)
        assert f"default {default}" in text, f"--help does not state --{flag}'s default {default!r}"


def help_blocks(text):
    """{flag: its --help entry as one line}."""
    blocks = re.split(r"\n  (?=--)", text.split("\noptions:", 1)[1])
    return {block.split()[0]: " ".join(block.split()) for block in blocks if block.startswith("--")}


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_trainer_help_states_every_default(script, monkeypatch, capsys):
    """Each flag whose default is a value (--batch_size 1, --dataset_num_workers 0, --lora_rank 32, ...) says it in
    --help; it was silent on most of them. No entry ends in a cut-off sentence (--selective_checkpointing did)."""
    from diffsynth.trainers.args import build_parser

    blocks = help_blocks(script_help(script, monkeypatch, capsys))
    parser = build_parser(TRAIN_SCRIPTS[script])
    valued = [a for a in parser._actions if a.option_strings and a.default not in (None, False, True, [])
              and a.default is not __import__("argparse").SUPPRESS]
    assert len(valued) > 15
    for action in valued:
        entry = blocks[action.option_strings[0]]
        assert "default" in entry.lower(), f"{script} --help: {entry!r} does not state the default {action.default!r}"
    assert "default 1" in blocks["--batch_size"] and "default 0" in blocks["--dataset_num_workers"]
    assert not any(entry.endswith("The same numbers") for entry in blocks.values())


def test_help_default_is_appended_once_and_not_over_a_stated_one():
    from diffsynth.utils.cli import ArgumentParser

    parser = ArgumentParser(prog="x")
    parser.add_argument("--n", type=int, default=3, help="count")
    parser.add_argument("--name", default="a b")
    parser.add_argument("--mode", default="fast", help="how (default fast)")
    parser.add_argument("--flag", action="store_true", help="switch")
    parser.format_help()
    blocks = help_blocks(parser.format_help())
    assert blocks["--n"] == "--n N count (default 3)"
    assert blocks["--name"] == "--name NAME default 'a b'"
    assert blocks["--mode"] == "--mode MODE how (default fast)"
    assert blocks["--flag"] == "--flag switch"


SPEC = next((p for p in (ROOT.parent / "shared/spec/merged-qkv-quickstart.md",
                          Path("/work/shared/spec/merged-qkv-quickstart.md")) if p.is_file()), None)


@pytest.mark.skipif(SPEC is None, reason="the user's quickstart (shared/spec) is not on this machine")
def test_the_users_quickstart_commands_run_as_written(monkeypatch, capsys):
    """The contract: every command of the user's merged-QKV quickstart. Training commands pass --dry_run ('... other
    params ...' stands for Option 2's flags), the other scripts know every flag, flag fragments are trainer flags."""
    from diffsynth.trainers.args import build_parser
    from diffsynth.utils.io import save_safetensors

    trainer_flags = set(build_parser(True)._option_string_actions)
    commands = [list(map(str, c)) for c in doc_commands(SPEC)]
    option_2 = next(args for kind, _, _, args in map(parse_command, commands)
                    if kind == "train" and "--dataset_metadata_path" in args)
    kinds = []
    for tokens in commands:
        if "..." in tokens:  # "... other params ..." -> Option 2's flags (train.py: with the standard targets)
            i, j = tokens.index("..."), len(tokens) - 1 - tokens[::-1].index("...")
            standard = any(t.endswith("/train.py") for t in tokens[:i])
            filled = [STANDARD_TARGETS if standard and t == MERGED_TARGETS else t for t in option_2]
            tokens = tokens[:i] + filled + tokens[j + 1:]
        kind, _, target, args = parse_command(tokens)
        kinds.append(kind)
        for flag, value in given_flags(args).items():
            if flag in ("lora_fused", "lora_checkpoint") and not os.path.exists(value):
                save_safetensors({"transformer_blocks.0.attn.to_out.0.lora_A.weight": __import__("torch").ones(4, 64),
                                  "transformer_blocks.0.attn.to_out.0.lora_B.weight": __import__("torch").ones(64, 4)},
                                 value)
        if kind == "recipe":
            script, recipe_args = recipe_command(target)
            resolved = dry_run(script, recipe_args + args, monkeypatch, capsys)
            assert resolved["merged_qkv"] is True
        elif kind == "train":
            resolved = dry_run(target, args, monkeypatch, capsys)
            assert_resolved(args, resolved, f"{SPEC}: {shlex.join(tokens)}")
            assert resolved["merged_qkv"] is TRAIN_SCRIPTS[target]
        elif kind == "script":
            text = script_help(target, monkeypatch, capsys)
            for flag in given_flags(args):
                assert re.search(rf"--{flag}\b", text), f"{SPEC}: {target} has no --{flag}"
        elif kind == "flags":
            unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in trainer_flags]
            assert not unknown, f"{SPEC}: {unknown} are not trainer flags"
    assert {"recipe", "train", "script", "flags"} <= set(kinds), kinds


def test_quickstart_makes_no_unmeasured_speed_claim():
    text = (ROOT / "QUICKSTART.md").read_text()
    assert "BENCHMARKS.md" in text
    for line in text.splitlines():
        assert not re.search(r"\+\s*10-15\s*%|10-15\s*%\s*faster", line) or "not" in line, line


# ---- accelerate configs ---------------------------------------------------------------------------------------

def load_config(name):
    """The config as accelerate launch reads it: unknown top-level keys are an error there."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / TRAINING / name
    raw = yaml.safe_load(path.read_text())
    return raw, ClusterConfig.from_yaml_file(str(path))


def test_accelerate_configs_parse_as_accelerate_reads_them():
    from accelerate.commands.launch import launch_command_parser

    launch_flags = {a.dest for a in launch_command_parser()._actions}
    one, _ = load_config("accelerate_config_1gpu.yaml")
    assert (one["distributed_type"], one["num_processes"], one["mixed_precision"]) == ("NO", 1, "bf16")
    ddp, _ = load_config("accelerate_config_ddp.yaml")
    assert (ddp["distributed_type"], ddp["num_processes"], ddp["mixed_precision"]) == ("MULTI_GPU", 8, "bf16")
    fsdp, config = load_config("accelerate_config_fsdp.yaml")
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    options = fsdp["fsdp_config"]
    # launch copies fsdp_config.x to its --x flag; a key it does not know would be silently ignored
    assert set(options) <= launch_flags, set(options) - launch_flags
    assert options["fsdp_version"] == 2  # FSDP1 cannot flatten frozen bf16 and trainable fp32 weights together
    assert options["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert options["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "QwenImageTransformerBlock"


def test_fsdp_wraps_a_block_class_both_dits_have(tiny_dit_config):
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.models.qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV

    name = yaml.safe_load((ROOT / TRAINING / "accelerate_config_fsdp.yaml").read_text())["fsdp_config"][
        "fsdp_transformer_layer_cls_to_wrap"]
    for cls in (QwenImageDiT, QwenImageDiTMergedQKV):
        model = cls(**tiny_dit_config)
        blocks = [m for m in model.modules() if type(m).__name__ == name]
        assert len(blocks) == tiny_dit_config["num_layers"], f"{cls.__name__} has {len(blocks)} {name} modules"


def test_deepspeed_config_parses_as_accelerate_reads_it():
    from accelerate.commands.launch import launch_command_parser

    launch_flags = {a.dest for a in launch_command_parser()._actions}
    raw, config = load_config("accelerate_config_deepspeed_zero2.yaml")
    assert raw["distributed_type"] == "DEEPSPEED" and raw["mixed_precision"] == "bf16"
    assert set(raw["deepspeed_config"]) <= launch_flags, set(raw["deepspeed_config"]) - launch_flags
    assert config.deepspeed_config["zero_stage"] == 2


# ---- QUICKSTART's musubi-tuner / ai-toolkit tables ------------------------------------------------------------

MAPPING_SECTION = "## Coming from musubi-tuner or ai-toolkit"
INFERENCE_SCRIPT = "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py"
FOLDERS_SCRIPT = f"{TRAINING}/utils/folders_to_metadata.py"


def mapping_tables():
    """The section's tables as lists of rows (cells stripped), header and separator dropped."""
    text = (ROOT / "QUICKSTART.md").read_text()
    assert text.count(MAPPING_SECTION) == 1, f"QUICKSTART.md has no single {MAPPING_SECTION!r} section"
    section = text.split(MAPPING_SECTION, 1)[1].split("\n## ", 1)[0]
    tables, rows = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows[1:])
            rows = []
    return tables


def help_options(text):
    """The option strings an argparse --help lists (its option lines, not flags named in descriptions)."""
    return set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", text, re.M))


def test_mapping_tables_name_only_flags_that_exist(monkeypatch, capsys):
    """Every `--flag` in the "here" column of the musubi-tuner and ai-toolkit tables is an option of the trainer or
    the inference script (of folders_to_metadata.py where the cell names it), and a span that gives trainer flags
    with literal values parses (a misspelt choice such as `--timestep_sampling logitnormal` fails)."""
    from diffsynth.trainers.args import build_parser

    parser = build_parser(True)
    trainer = set(parser._option_string_actions)
    inference = help_options(script_help(INFERENCE_SCRIPT, monkeypatch, capsys))
    folders = help_options(script_help(FOLDERS_SCRIPT, monkeypatch, capsys))
    assert {"--prompt", "--cfg_scale"} <= inference and {"--images", "--control"} <= folders  # the parsing works
    tables = mapping_tables()
    assert len(tables) == 2, f"expected the musubi-tuner and the ai-toolkit table, found {len(tables)}"
    assert len(tables[0]) >= 40 and len(tables[1]) >= 30, [len(t) for t in tables]
    named = 0
    for rows in tables:
        for row in rows:
            assert len(row) == 3, f"QUICKSTART.md mapping row without 3 cells: {row}"
            here = row[1]
            known = folders if FOLDERS_SCRIPT.rsplit("/", 1)[1] in here else trainer | inference
            for span in re.findall(r"`([^`]*)`", here):
                flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", span)
                unknown = [f for f in flags if f not in known]
                assert not unknown, f"QUICKSTART.md mapping row {row[0]!r}: {unknown} are not options of ours"
                named += len(flags)
                tokens = shlex.split(span)
                values = [t for t in tokens if not t.startswith("--")]
                if (flags and tokens[0].startswith("--") and all(f in trainer for f in flags) and values
                        and not any(re.fullmatch(r"[A-Z]+", t) for t in values)):
                    try:
                        parser.parse_known_args([*tokens, "--dataset_metadata_path", "m.csv"])
                    except SystemExit:
                        pytest.fail(f"QUICKSTART.md mapping row {row[0]!r}: `{span}` does not parse: "
                                    f"{capsys.readouterr().err}")
    assert named >= 80, named
