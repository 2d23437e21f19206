"""--validation_prompts FILE: several validation samples, each in validation/<k>/; bad files refused before models
load."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from diffsynth.trainers import main, parse_args
from test_trainer import flags


def write_prompts(folder, data):
    """Samples in a folder beside the data (relative edit_image paths are resolved against the file's folder); the
    third is the first without its seed."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "prompts.json")
    edit = os.path.relpath(os.path.join(data, "edits", "edit000.png"), folder)
    with open(path, "w") as f:
        json.dump([{"prompt": "make the red square blue", "edit_image": edit, "seed": 7},
                   {"prompt": "a green square", "width": 32, "height": 48, "steps": 1},
                   {"prompt": "make the red square blue", "edit_image": edit}], f)
    return path


def test_two_samples_write_their_images(tiny_models, data, tmp_path, capsys):
    prompts = write_prompts(str(tmp_path / "prompts"), data)
    out = str(tmp_path / "out")
    argv = flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--validation_prompts", prompts,
                 "--validation_steps", "1", "--validation_inference_steps", "2")
    assert main(argv + ["--dry_run"]) == 0
    listed = capsys.readouterr().err
    assert "validation: 3 sample(s), every 1 steps and at the end:" in listed
    assert "validation/1/ (row 1): 'make the red square blue'; 1 edit image(s)" in listed
    assert "seed 7, 2 steps" in listed
    assert "validation/2/ (row 2): 'a green square'; 0 edit image(s); seed 0, 1 steps, 32x48" in listed
    assert main(argv + ["--dry_run", "--validation_at_start"]) == 0  # the list says when, the baseline too
    assert "validation: 3 sample(s), before the first step, every 1 steps and at the end:" in capsys.readouterr().err
    assert main(argv) == 0
    folder = os.path.join(out, "validation")
    assert sorted(os.listdir(folder)) == ["1", "2", "3"]
    for k in ("1", "2", "3"):
        assert sorted(os.listdir(os.path.join(folder, k))) == ["final.png", "grid.png", "step-1.png"]
    first = Image.open(os.path.join(folder, "1", "step-1.png"))
    assert first.size == (64, 64)  # the edit image's size
    assert first.text == {"step": "step 1", "prompt": "make the red square blue"}
    assert Image.open(os.path.join(folder, "2", "final.png")).size == (32, 48)  # the row's width and height
    # sample 3 is sample 1 at the run's --seed 0 instead of its seed 7
    assert Image.open(os.path.join(folder, "3", "step-1.png")).tobytes() != first.tobytes()
    # the grid of sample 1: its input, then step 1 and the final image
    assert Image.open(os.path.join(folder, "1", "grid.png")).width == 3 * 64


def test_a_bad_file_names_file_row_and_column_before_models_load(tiny_models, data, tmp_path, capsys, monkeypatch):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", no_loading)
    Image.new("RGB", (2000, 8)).save(tmp_path / "wide.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,edit_image,seed,guidance,cfg_scale\n"
                   "blue,missing.png,x,,\n"
                   ",wide.png,3,2,0.5\n"
                   "red,broken.png,,,\n")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    txt = tmp_path / "musubi.txt"
    txt.write_text("# a comment\nmake it blue --d 5 --w 64 --h 48\nmake it red --n ugly --g 3.5\n")
    out = str(tmp_path / "out")
    for extra in (["--dry_run"], []):
        assert main(flags(tiny_models, data, out, "--validation_prompts", str(bad), *extra)) == 2
        err = capsys.readouterr().err
        assert f"error: --validation_prompts {bad}: 7 problem(s):" in err and "Traceback" not in err
        assert "row 1 (line 2): unknown column 'guidance'; the columns are prompt, edit_image" in err
        assert "row 2 (line 3): cfg_scale '0.5' must be a number >= 1 (1: no CFG)" in err
        assert "row 1 (line 2): seed 'x' must be a whole number >= 0" in err
        assert f"row 1 (line 2): edit_image missing.png file not found (looked at {tmp_path / 'missing.png'})" in err
        assert "row 2 (line 3): no prompt" in err
        assert "row 2 (line 3): edit_image wide.png: its 2000x8 px aspect ratio is too extreme" in err
        assert "row 3 (line 4): edit_image broken.png is not an image file Pillow can read" in err
        assert main(flags(tiny_models, data, out, "--validation_prompts", str(txt), *extra)) == 2
        err = capsys.readouterr().err
        assert f"--validation_prompts {txt}:\n  line 3: --g is not supported here (an embedded guidance scale" in err
    assert main(flags(tiny_models, data, out, "--validation_prompts", str(tmp_path / "none.json"))) == 2
    assert f"error: --validation_prompts {tmp_path / 'none.json'}: file not found" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "train_log.csv"))


@pytest.mark.parametrize("extra, message", [
    (["--validation_prompt", "blue"], "--validation_prompts p.json and --validation_prompt are two sources"),
    (["--validation_edit_image", "a.png"], "--validation_prompts p.json and --validation_edit_image are two sources"),
])
def test_validation_prompts_and_the_single_prompt_flags_exclude_each_other(tiny_models, data, tmp_path, capsys,
                                                                          extra, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--validation_prompts", "p.json", *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_validation_prompts_is_a_prompt_source_for_the_other_flags(tiny_models, data, tmp_path, capsys):
    args = parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--validation_prompts", "p.json",
                            "--validation_steps", "5", "--validation_inference_steps", "4", "--extra_inputs", ""))
    assert args.validation_steps == 5 and args.validation_inference_steps == 4  # and --edit_image_area: the file
    with pytest.raises(SystemExit):
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--validation_inference_steps", "4"))
    assert "--validation_inference_steps needs --validation_prompt (or --validation_prompts FILE)" in \
        capsys.readouterr().err


def test_every_format_reads_the_same_samples(tmp_path):
    """.jsonl, .csv (several edit images '|'-separated, empty cells are no value) and musubi-tuner's .txt; relative
    paths against the file's folder."""
    from dataclasses import replace

    from diffsynth.trainers.validation import ValidationSample, read_validation_prompts

    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48)).save(tmp_path / name)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    want = [ValidationSample("blue", (a, b), 5, 64, 48, 3, "1", "?"), ValidationSample("red", (a,), folder="2",
                                                                                        where="?")]
    files = {"p.jsonl": '{"prompt": "blue", "edit_image": ["a.png", "b.png"], "seed": 5, "width": 64, "height": 48, '
                        '"steps": 3}\n\n{"prompt": "red", "edit_image": "a.png"}\n',
             "p.csv": "prompt,edit_image,seed,width,height,steps\nblue,a.png|b.png,5,64,48,3\nred,a.png,,,,\n",
             "p.txt": "# samples\nblue --d 5 --ci a.png --ci b.png --w 64 --h 48 --s 3\n\nred --ci a.png\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        got = [replace(s, where="?") for s in read_validation_prompts(str(tmp_path / name), 4096)]
        assert got == want, name


def test_a_txt_option_without_a_value_is_named(tmp_path):
    """musubi-tuner's '--d' or '--s' with nothing after it was dropped as an empty cell: the sample ran at the run's
    seed or steps without a word. Each is named with its line."""
    from diffsynth.trainers.validation import ValidationPromptsError, read_validation_prompts

    with pytest.raises(ValidationPromptsError, match=r"p.txt is a folder; name the prompts file in it"):
        os.makedirs(tmp_path / "p.txt")  # a folder is named as one, not 'file not found'
        read_validation_prompts(str(tmp_path / "p.txt"), 4096)
    os.rmdir(tmp_path / "p.txt")
    path = tmp_path / "p.txt"
    path.write_text("blue --d\nred --s 3 --ci\n")
    with pytest.raises(ValidationPromptsError) as e:
        read_validation_prompts(str(path), 4096)
    assert "line 1: --d without a value; give its seed (--d <value>), or leave it out" in str(e.value)
    assert "line 2: --ci without a value; give its edit image (--ci <value>), or leave it out" in str(e.value)


def test_validation_at_start_writes_the_baseline_once(tiny_models, data, tmp_path):
    """--validation_at_start: step-0.png before any update (the LoRA's B is zero, so it is the base DiT's edit) and
    first in the grid; a resumed run does not validate at its start again."""
    from conftest import TINY_MODEL_IDS
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    out = str(tmp_path / "out")
    edit = os.path.join(data, "edits", "edit000.png")
    argv = flags(tiny_models, data, out, "--cache_conditioning", "--validation_prompt", "make it blue",
                 "--validation_edit_image", edit, "--validation_inference_steps", "2", "--validation_at_start",
                 "--save_steps", "1", "--learning_rate", "0.05")
    assert main(argv + ["--max_steps", "1"]) == 0
    folder = os.path.join(out, "validation")
    assert sorted(os.listdir(folder)) == ["final.png", "grid.png", "step-0.png"]
    baseline = Image.open(os.path.join(folder, "step-0.png"))
    assert baseline.text["step"] == "step 0"
    pipe = QwenImagePipeline.from_pretrained(model_id_with_origin_paths=TINY_MODEL_IDS, models_dir=tiny_models)
    # as the inference script makes it by default: true CFG 4 with the negative prompt " "
    base = pipe("make it blue", edit_image=Image.open(edit), seed=0, num_inference_steps=2, edit_image_area=4096,
                progress=False, negative_prompt=" ", cfg_scale=4.0)
    assert np.array_equal(np.asarray(base), np.asarray(baseline))
    # the trained LoRA (a high lr, one step) edits visibly otherwise: step-0 is not an image taken after a step
    assert not np.array_equal(np.asarray(Image.open(os.path.join(folder, "final.png"))), np.asarray(baseline))
    assert Image.open(os.path.join(folder, "grid.png")).width == 3 * 64  # input, step 0, final
    written = os.stat(os.path.join(folder, "step-0.png")).st_mtime_ns
    assert main(argv + ["--max_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    assert os.stat(os.path.join(folder, "step-0.png")).st_mtime_ns == written
    assert sorted(os.listdir(folder)) == ["final.png", "grid.png", "step-0.png"]


def test_validation_cfg_follows_the_row_then_the_flags(tiny_pipe, data, tmp_path):
    """Each sample's image is the pipeline's with the seed, steps and CFG the row gives, else the run's --seed,
    --validation_inference_steps, --validation_cfg_scale and --validation_negative_prompt; cfg 1 runs without CFG
    (and computes no negative embedding)."""
    from types import SimpleNamespace

    from diffsynth.trainers.validation import ValidationInputs, validation_samples
    from diffsynth.utils.image import open_image

    edit = os.path.join(data, "edits", "edit000.png")
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "blue", "edit_image": edit, **row}) for row in (
        {"cfg_scale": 1}, {"negative_prompt": "ugly", "cfg_scale": 3, "seed": 5, "steps": 1}, {})))
    args = SimpleNamespace(validation_prompts=str(path), edit_image_area=4096, seed=0, validation_inference_steps=2,
                           validation_cfg_scale=2.0, validation_negative_prompt="dull")
    samples = validation_samples(args)
    assert [(s.seed, s.steps, s.cfg_scale, s.negative_prompt) for s in samples] == [
        (0, 2, 1.0, "dull"), (5, 1, 3.0, "ugly"), (0, 2, 2.0, "dull")]
    inputs = ValidationInputs(tiny_pipe, samples, 4096)
    assert inputs.negative_embeds[0] is None
    images = []
    for k, run in enumerate([{"seed": 0, "num_inference_steps": 2},
                             {"negative_prompt": "ugly", "cfg_scale": 3.0, "seed": 5, "num_inference_steps": 1},
                             {"negative_prompt": "dull", "cfg_scale": 2.0, "seed": 0, "num_inference_steps": 2}]):
        images.append(np.asarray(inputs.generate(tiny_pipe, k, 4096)))
        expected = tiny_pipe("blue", edit_image=open_image(edit), edit_image_area=4096, progress=False, **run)
        assert np.array_equal(images[-1], np.asarray(expected)), k
    assert not np.array_equal(images[0], images[2]) and not np.array_equal(images[1], images[2])
    args.validation_negative_prompt = None  # unset: the inference script's default negative prompt, " "
    assert {s.negative_prompt for s in validation_samples(args)} == {"ugly", " "}


def test_an_output_folder_with_glob_characters_keeps_its_grids_and_its_earlier_run(tiny_models, data, tmp_path):
    """Folder names are not glob patterns: in `out [1]` the grid of a sample without edit images found no step
    image (glob read `[1]` as a character class) and validation crashed with an IndexError; an earlier run's
    checkpoint there went unseen, so a new run would have replaced it without --overwrite."""
    from diffsynth.trainers.output_dir import previous_run_files

    prompts = write_prompts(str(tmp_path / "prompts [a]"), data)
    out = str(tmp_path / "out [1]")
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--validation_prompts",
                      prompts, "--validation_at_start", "--validation_steps", "1",
                      "--validation_inference_steps", "1")) == 0
    for k, inputs in (("1", 1), ("2", 0)):  # tiles: the inputs, steps 0 and 1, the final image (step 2)
        width = Image.open(os.path.join(out, "validation", k, "grid.png")).width
        tile = Image.open(os.path.join(out, "validation", k, "final.png")).width
        assert width == (inputs + 3) * tile, k
    assert "checkpoint-final.safetensors" in previous_run_files(out)
    assert main(flags(tiny_models, data, out, "--max_steps", "1")) == 2  # refused: the earlier run's files


def test_a_run_killed_while_writing_a_validation_image_leaves_no_cut_off_file(tiny_models, data, tmp_path,
                                                                               monkeypatch):
    """step-N.png and grid.png are written atomically: a kill mid-write used to leave a cut-off step-N.png, which
    every later grid of that folder (the resumed run's) opened and failed on."""
    real = Image.Image.save

    def killed_mid_write(self, fp, format=None, **params):
        if str(fp).endswith("step-1.png"):
            import io

            buffer = io.BytesIO()
            real(self, buffer, format="PNG", **params)
            with open(fp, "wb") as f:
                f.write(buffer.getvalue()[:40])
            raise KeyboardInterrupt
        return real(self, fp, format=format, **params)

    prompts = write_prompts(str(tmp_path / "prompts"), data)
    out = str(tmp_path / "out")
    monkeypatch.setattr(Image.Image, "save", killed_mid_write)
    assert main(flags(tiny_models, data, out, "--max_steps", "2", "--cache_conditioning", "--validation_prompts",
                      prompts, "--validation_at_start", "--validation_steps", "1",
                      "--validation_inference_steps", "1")) == 130
    folder = os.path.join(out, "validation", "1")
    assert sorted(os.listdir(folder)) == ["grid.png", "step-0.png"]  # no step-1.png, whole or cut
    for name in os.listdir(folder):
        Image.open(os.path.join(folder, name)).load()
