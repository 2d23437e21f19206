"""The inference script end to end on the tiny models (CPU, 2 steps), run as the quickstart runs it."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import modelscope
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL_IDS
from diffsynth.lora import save_lora
from diffsynth.models import load_qwen_image_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")
FAST = ["--num_steps", "2", "--edit_image_area", "4096", "--device", "cpu"]


def run(*args):
    # one thread: the tests run two workers on two cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


@pytest.fixture
def images(tmp_path):
    rng = np.random.RandomState(0)
    paths = {}
    for name, (w, h) in (("input", (64, 64)), ("edit", (80, 48))):
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(paths[name])
    return paths


@pytest.fixture
def merged_lora(tiny_models, tmp_path):
    """A LoRA as train_merged_qkv.py writes it: native keys on to_qkv / add_qkv_proj, random non-zero weights."""
    import torch

    dit = load_qwen_image_dit(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), merged_qkv=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, module in dit.named_modules():
        if name.endswith(("attn.to_qkv", "attn.add_qkv_proj")):
            sd[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    path = str(tmp_path / "checkpoint-final.safetensors")
    save_lora(sd, path, rank=4, alpha=4, target_modules="to_qkv,add_qkv_proj", architecture="merged_qkv")
    return path


@pytest.mark.slow
def test_quickstart_command_writes_the_png(tiny_models, images, merged_lora, tmp_path):
    out = tmp_path / "out" / "output.png"
    result = run("--input_image", images["input"], "--edit_image", images["edit"], "--prompt", "make the sky blue",
                 "--output", str(out), "--lora_path", merged_lora,
                 "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models, *FAST)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as img:
        # --input_image (64x64) sets the output's aspect ratio at --edit_image_area 4096: 64x64 (the edit image,
        # 80x48, would give 96x64)
        assert img.format == "PNG" and img.size == (64, 64)
        pixels = np.asarray(img)
    assert pixels.std() > 0
    assert "sets the output size 64x64; its pixels are not used at --denoising_strength 1.0" in result.stderr
    assert "fused" in result.stdout and "into 4 layers" in result.stdout
    assert "peak memory:" in result.stdout
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp")]


@pytest.mark.slow
def test_standard_dit_model_paths_and_init_image(tiny_models, images, merged_lora, tmp_path):
    root = os.path.join(tiny_models, "tiny-random")
    model_paths = [f"{root}/Qwen-Image-Edit/transformer", f"{root}/Qwen-Image/text_encoder",
                   f"{root}/Qwen-Image/vae/diffusion_pytorch_model.safetensors"]
    out = tmp_path / "edited.jpg"
    out.write_bytes(b"an earlier output")
    result = run("--edit_image", images["edit"], "--prompt", "add a dog", "--output", str(out), "--standard",
                 "--lora_path", merged_lora, "--model_paths", json.dumps(model_paths),
                 "--tokenizer_path", f"{root}/Qwen-Image/tokenizer",
                 "--processor_path", f"{root}/Qwen-Image-Edit/processor",
                 "--input_image", images["input"], "--denoising_strength", "0.6", "--cfg_scale", "1",
                 "--height", "48", "--width", "40", "--dtype", "fp32", "--blocks_to_swap", "1",
                 "--offload", "sequential", *FAST)
    assert result.returncode == 0, result.stderr
    assert "no effect" not in result.stderr
    # on the CPU the two GPU-memory flags run but change nothing: said in one line
    assert ("note: --offload and --blocks_to_swap keep data in host memory for a GPU; on the CPU everything is in "
            "host memory already, so this run is the same without them") in result.stderr
    assert f"saved {out} (32x48; replaced the existing file)" in result.stdout
    # the peak is printed; without a GPU it says so and gives the process's RSS instead
    assert "peak memory: GPU not used (cpu); peak RSS of this process" in result.stdout
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (32, 48)  # width rounded down to 16
    # the merged LoRA is split over the standard DiT's to_q/to_k/to_v (+ the added projections)
    assert "into 12 layers" in result.stdout


@pytest.mark.slow
def test_missing_input_file_is_one_line_and_exit_2(tmp_path, images):
    missing = str(tmp_path / "no-such-edit.png")
    result = run("--input_image", images["input"], "--edit_image", missing, "--prompt", "x",
                 "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert missing in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o.png").exists()


def load_script():
    spec = importlib.util.spec_from_file_location("inference_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_models_offline_is_a_clear_error(tmp_path, images, monkeypatch, capsys):
    def offline(model_id, **kwargs):
        raise ConnectionError(f"cannot reach modelscope.cn for {model_id}")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    code = load_script().main(["--edit_image", images["edit"], "--prompt", "x", "--output", str(tmp_path / "o.png"),
                               "--models_dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2
    # the default model ids, resolved under --models_dir
    assert f"{tmp_path}/models/Qwen/Qwen-Image-Edit/transformer/diffusion_pytorch_model*.safetensors" in err
    assert "download failed (ConnectionError" in err and "Traceback" not in err


def test_bad_flags(tmp_path, images, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as e:
        script.main(["--input_image", images["input"], "--prompt", "x"])
    assert e.value.code == 2 and "--edit_image is required" in capsys.readouterr().err
    assert script.main(["--edit_image", images["edit"], "--prompt", "x", "--output", str(tmp_path / "o.xyz")]) == 2
    assert "unknown image extension '.xyz'" in capsys.readouterr().err


def save_trained(tiny_models, path, lora_type="loha", alpha=4.0, trained=True):
    """A LoHa / LoKr / DoRA as the trainer's --lora_type writes it (native keys, rank/alpha/lora_type metadata):
    random weights, or peft's initialisation (a zero delta) with trained=False."""
    import torch

    from diffsynth.lora import inject_lora, lora_state_dict
    from diffsynth.lora.adapters import save_adapter

    dit = load_qwen_image_dit(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), merged_qkv=True)
    inject_lora(dit, "to_qkv", 2, alpha, lora_type=lora_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in dit.parameters() if p.requires_grad and trained):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(lora_state_dict(dit), path, lora_type, 2, alpha, "to_qkv", "merged_qkv")
    return path


@pytest.mark.slow
def test_loha_from_the_trainer_loads(tiny_models, images, tmp_path):
    loha = save_trained(tiny_models, str(tmp_path / "loha.safetensors"))
    out = tmp_path / "o.png"
    result = run("--edit_image", images["edit"], "--prompt", "x", "--output", str(out), "--lora_path", loha,
                 "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models, *FAST)
    assert result.returncode == 0, result.stderr
    assert f"fused {loha} into 2 layers" in result.stdout and out.exists()


@pytest.mark.parametrize("lora_type", ["loha", "lokr", "dora"])
def test_trainer_adapters_pass_the_preflight(tiny_models, images, tmp_path, capsys, lora_type):
    script = load_script()
    path = save_trained(tiny_models, str(tmp_path / f"{lora_type}.safetensors"), lora_type)
    args = script.parse_args(["--edit_image", images["edit"], "--prompt", "x", "--output", str(tmp_path / "o.png"),
                              "--lora_path", path])
    samples, images, _ = script.open_inputs(args)
    assert len(samples) == len(images) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("lora_type, alpha, trained", [("loha", 0.0, True), ("loha", 4.0, False),
                                                       ("lokr", 4.0, False), ("lora", 4.0, False)])
def test_lora_that_changes_nothing_is_refused(tiny_models, images, merged_lora, tmp_path, capsys, lora_type, alpha,
                                              trained):
    import torch

    from diffsynth.lora import read_lora

    path = str(tmp_path / "zero.safetensors")
    if lora_type == "lora":  # an untrained LoRA: B = 0
        save_lora({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in read_lora(merged_lora).items()}, path,
                  rank=4, alpha=4, target_modules="to_qkv,add_qkv_proj", architecture="merged_qkv")
    else:
        save_trained(tiny_models, path, lora_type, alpha, trained)
    code = load_script().main(["--edit_image", images["edit"], "--prompt", "x", "--output", str(tmp_path / "o.png"),
                               "--lora_path", path, "--models_dir", str(tmp_path / "no-models")])
    err = capsys.readouterr().err
    assert code == 2 and f"--lora_path {path}: every delta is zero" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--denoising_strength", "0.5"], "--denoising_strength 0.5 needs --input_image"),
    (["--lora_scale", "0.5"], "--lora_scale without --lora_path"),
    (["--cfg_scale", "0.5"], "--cfg_scale must be >= 1 (got 0.5); 1 turns CFG off"),
])
def test_flags_that_would_be_ignored_are_refused(images, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        load_script().main(["--edit_image", images["edit"], "--prompt", "x", "--output", str(tmp_path / "o.png"),
                            *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_inputs_refused_before_models_load(images, tmp_path, capsys):
    script = load_script()
    narrow = str(tmp_path / "narrow.png")
    Image.new("RGB", (1, 3000)).save(narrow)
    base = ["--prompt", "x", "--models_dir", str(tmp_path / "no-models")]
    cases = [
        (["--edit_image", images["edit"], "--output", str(tmp_path / "o.psd")], "Pillow cannot write PSD (.psd)"),
        (["--edit_image", images["edit"], "--output", images["edit"]], "is also an input image"),
        (["--edit_image", images["edit"], "--input_image", images["input"], "--output", images["input"]],
         "is also an input image"),
        (["--edit_image", narrow, "--output", str(tmp_path / "o.png")],
         f"--edit_image {narrow}: its 1x3000 px aspect ratio is too extreme"),
        (["--edit_image", images["edit"], "--output", str(tmp_path / "o.png"), "--edit_image_area", "100000000"],
         "--edit_image_area must be <= 16777216"),
        # os.access says yes to root everywhere: the check creates a file, as the save would
        (["--edit_image", images["edit"], "--output", "/proc/x.png"], "--output /proc/x.png: cannot create a file in "
                                                                       "/proc"),
    ]
    for flags, message in cases:
        assert script.main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line, before any model (none exist) is looked up


@pytest.mark.slow
def test_fp8_compute_on_the_cpu_does_what_help_says(tiny_models, images, merged_lora, tmp_path):
    """--help: older GPUs fall back to fp8 storage (saying so), a CPU runs the fp8 matmuls emulated. The earlier
    help said 'elsewhere fp8 storage only', while the CPU ran fp8 matmuls."""
    from diffsynth.utils.fp8 import fp8_compute_problem

    help_text = " ".join(run("--help").stdout.split())
    assert "a CPU runs the fp8 matmuls emulated" in help_text
    result = run("--edit_image", images["edit"], "--prompt", "p", "--output", str(tmp_path / "o.png"),
                 "--lora_path", merged_lora, "--fp8_compute",
                 "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models, *FAST)
    assert result.returncode == 0, result.stderr
    problem = fp8_compute_problem("cpu")
    if problem is None:
        assert re.search(r"fp8 compute: (\d+) frozen linear layers stored in float8_e4m3fn, \1 of them with fp8 "
                         r"matmuls", result.stdout), result.stdout
    else:
        assert problem in result.stdout + result.stderr


@pytest.mark.slow
def test_prompts_file_writes_each_row_as_its_single_image_run(tiny_models, images, merged_lora, tmp_path):
    """--prompts: the models load once, row k is <output>/00k.png, bit-identical to a --prompt run with the row's
    values; what a row leaves out comes from the flags, its relative paths from the file's folder."""
    rows = tmp_path / "rows"
    rows.mkdir()
    Image.open(images["input"]).save(rows / "edit2.png")
    (rows / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "make the sky blue", "seed": 3},
        {"prompt": "add a dog", "edit_image": "edit2.png", "steps": 1, "cfg_scale": 1},
        {"prompt": "a red car", "width": 32, "height": 48, "negative_prompt": "blurry"},
    ]))
    model = ["--lora_path", merged_lora, "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models]
    out = tmp_path / "out"
    result = run("--prompts", str(rows / "prompts.jsonl"), "--edit_image", images["edit"], "--output", str(out),
                 "--seed", "5", *model, *FAST)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["001.png", "002.png", "003.png"]  # no temporary file left
    assert result.stdout.count("fused ") == 1  # the LoRA (and the models) loaded once
    assert f"[2/3] row 2 (line 2) (seed 5): saved {out / '002.png'} (64x64)" in result.stdout
    assert f"wrote 3 images to {out}" in result.stdout
    sizes = {}
    for name in os.listdir(out):
        with Image.open(out / name) as img:
            sizes[name] = img.size
    # row 1: --edit_image (80x48) at --edit_image_area 4096; row 2: its own 64x64 edit image; row 3: its width/height
    assert sizes == {"001.png": (96, 64), "002.png": (64, 64), "003.png": (32, 48)}
    single = tmp_path / "single.png"
    script = load_script()  # in this process: no second interpreter start
    for name, flags in (("002.png", ["--edit_image", str(rows / "edit2.png"), "--prompt", "add a dog", "--seed", "5",
                                     "--cfg_scale", "1", *FAST, "--num_steps", "1"]),
                        ("003.png", ["--edit_image", images["edit"], "--prompt", "a red car", "--seed", "5",
                                     "--width", "32", "--height", "48", "--negative_prompt", "blurry", *FAST])):
        assert script.main([*flags, "--output", str(single), *model]) == 0
        assert single.read_bytes() == (out / name).read_bytes(), name


class NoLoading(Exception):
    pass


def test_prompts_rows_checked_before_models_load(images, tmp_path, capsys, monkeypatch):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    def no_loading(*args, **kwargs):
        raise NoLoading("a model loaded")

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", no_loading)
    script = load_script()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine --d 1\n# a comment\nbad seed --d x --s 0\nmissing --ci nope.png\nvideo --f 9\ncfg --g 4\n")
    out = tmp_path / "out"
    assert script.main(["--prompts", str(prompts), "--edit_image", images["edit"], "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--prompts {prompts}:" in err and "Traceback" not in err
    for problem in ("line 5: --f is not supported here (a frame count is for video models)",
                    # musubi's Qwen-Image --from_file takes --g as its CFG scale: the message points to --l
                    "line 6: --g is not supported here (an embedded guidance scale does not exist in Qwen-Image; "
                    "musubi-tuner's qwen_image_generate_image.py --from_file reads --g as the CFG scale: write --l "
                    "for that)"):
        assert problem in err, err
    prompts.write_text("fine --d 1\n# a comment\nbad seed --d x --s 0\nmissing --ci nope.png\n")
    assert script.main(["--prompts", str(prompts), "--edit_image", images["edit"], "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--prompts {prompts}: 3 problem(s):" in err, err
    for problem in ("line 3: --d 'x' must be a whole number >= 0", "line 3: --s '0' must be a whole number >= 1",
                    f"line 4: --ci nope.png file not found (looked at {tmp_path / 'nope.png'})"):
        assert problem in err, err
    # a row without an edit image needs --edit_image
    prompts.write_text("fine --ci " + images["edit"] + "\nno image --d 2\n")
    assert script.main(["--prompts", str(prompts), "--output", str(out)]) == 2
    assert f"--prompts {prompts}: line 2: no edit image" in capsys.readouterr().err
    assert not out.exists()


def test_prompts_flag_conflicts(images, tmp_path, capsys):
    script = load_script()
    prompts = tmp_path / "evals.txt"
    prompts.write_text(f"one --ci {images['edit']}\n")
    args = script.parse_args(["--prompts", str(prompts)])
    assert args.output == os.path.join("outputs", "evals") and args.prompt is None
    refused = [
        (["--prompt", "x"], "argument --prompt: not allowed with argument --prompts"),
        (["--input_image", images["input"]], "--input_image with --prompts"),
        (["--denoising_strength", "0.5"], "--denoising_strength with --prompts"),
        (["--output", str(tmp_path / "o.png")], f"--output {tmp_path / 'o.png'} names an image file; with --prompts "
                                                "it is the folder"),
    ]
    for flags, message in refused:
        with pytest.raises(SystemExit) as e:
            script.main(["--prompts", str(prompts), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main(["--edit_image", images["edit"]])
    assert e.value.code == 2 and "one of the arguments --prompt --prompts is required" in capsys.readouterr().err
    taken = tmp_path / "results"
    taken.write_text("a file")
    assert script.main(["--prompts", str(prompts), "--output", str(taken), "--models_dir", str(tmp_path / "m")]) == 2
    assert f"--output {taken} is a file; with --prompts it is the folder" in capsys.readouterr().err
    # the folder holds a row's edit image under an output name: refused, not overwritten
    out = tmp_path / "out"
    out.mkdir()
    Image.open(images["edit"]).save(out / "001.png")
    prompts.write_text(f"one --ci {out / '001.png'}\n")
    assert script.main(["--prompts", str(prompts), "--output", str(out), "--models_dir", str(tmp_path / "m")]) == 2
    assert f"--output {out / '001.png'} is also an input image" in capsys.readouterr().err


def test_prompts_rows_cfg_above_one_with_lightning_are_warned_of_as_the_flag(images, tmp_path, capsys):
    """--scheduler_preset lightning runs at cfg 1; a row's own cfg_scale overrides that as --cfg_scale does, and
    is warned of as the flag is."""
    script = load_script()
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"one --ci {images['edit']} --l 4\ntwo --ci {images['edit']}\nthree --l 1\n")
    args = script.parse_args(["--prompts", str(prompts), "--edit_image", images["edit"], "--scheduler_preset",
                              "lightning", "--output", str(tmp_path / "out")])
    samples, _, _ = script.open_inputs(args)
    assert [s.cfg_scale for s in samples] == [4.0, 1.0, 1.0]
    assert (f"warning: --prompts {prompts}: cfg_scale above 1 with --scheduler_preset lightning in line 1 (4): the "
            "Lightning LoRAs are distilled to run without CFG (cfg 1)") in capsys.readouterr().err
    args = script.parse_args(["--prompts", str(prompts), "--edit_image", images["edit"], "--output",
                              str(tmp_path / "out")])
    script.open_inputs(args)  # the default scheduler: CFG 4 is its default, nothing to warn of
    assert "warning" not in capsys.readouterr().err
