"""folders_to_metadata.py: musubi-tuner / ai-toolkit image folders -> a metadata file the trainer reads as is."""
import os
import shlex
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_MODEL_IDS, load_script
from diffsynth.trainers.dataset import read_metadata, validate_metadata

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = load_script(ROOT / "examples/qwen_image/model_training/utils/folders_to_metadata.py", "folders_to_metadata")
# A caption the CSV must carry intact: a comma, quotes, a newline, non-ASCII, spaces to strip, a BOM.
TRICKY = '\ufeff  make it red, then "blue"\r\nand keep the café sign  \n'


def image(path, colour="blue"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path)


def dataset(root, stems=("a", "b"), controls=1, musubi=False):
    """targets/<stem>.png + .txt; controls in control0/, control1/ (ai-toolkit) or control/<stem>_<i>.png (musubi)."""
    for stem in stems:
        image(root / "targets" / f"{stem}.png")
        (root / "targets" / f"{stem}.txt").write_text(f"edit {stem}", encoding="utf-8")
        for i in range(controls):
            colour = (200, 10 * i, 0)
            if musubi:
                image(root / "control" / f"{stem}_{i}.png", colour)
            else:
                image(root / f"control{i}" / f"{stem}.jpg", colour)
    return root


def run(argv, capsys):
    try:
        code = SCRIPT.main([str(a) for a in argv])
    except SystemExit as e:  # a flag error, from the parser
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def trained_rows(output):
    """(target, edit images, prompt) as the trainer's validation resolves them from the output's folder."""
    samples = validate_metadata(output, base_path=os.path.dirname(output), max_pixels=4096, edit_area=4096)
    return [(s.image, list(s.edit_images), s.prompt) for s in samples]


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".json"])
def test_one_control_folder_reads_back_identically(tmp_path, capsys, ext):
    root = dataset(tmp_path)
    (root / "targets" / "a.txt").write_bytes(TRICKY.encode("utf-8"))
    (root / "targets" / "b.txt").write_text("1")  # a prompt that looks like a number stays text
    (root / "targets" / ".DS_Store").write_bytes(b"\0")  # dotfiles and subfolders hold no samples
    (root / "targets" / "old").mkdir()
    output = tmp_path / "out" / f"metadata{ext}"
    code, out, err = run(["--images", root / "targets", "--control", root / "control0", "--output", output], capsys)
    assert code == 0, err
    prompt = 'make it red, then "blue"\nand keep the café sign'
    assert trained_rows(output) == [
        (str(root / "targets/a.png"), [str(root / "control0/a.jpg")], prompt),
        (str(root / "targets/b.png"), [str(root / "control0/b.jpg")], "1")]
    first = read_metadata(output)[0][1]
    assert first["image"] == "../targets/a.png"  # relative to the output's folder
    assert f"--dataset_base_path {tmp_path / 'out'}" in out and "--dataset_metadata_path" in out


def test_several_control_folders_give_edit_images_in_folder_order(tmp_path, capsys):
    root = dataset(tmp_path, controls=2)
    output = tmp_path / "metadata.csv"
    code, out, err = run(["--images", root / "targets", "--control", root / "control1", "--control",
                          root / "control0", "--output", output], capsys)
    assert code == 0, err
    assert [r[1] for r in trained_rows(output)] == [[str(root / f"control1/{s}.jpg"), str(root / f"control0/{s}.jpg")]
                                                     for s in ("a", "b")]
    assert read_metadata(output)[0][1]["edit_image"] == "control1/a.jpg|control0/a.jpg"
    assert "2 with 2 edit image(s)" in out and "2509" in out


def test_musubi_numbered_controls_in_one_folder(tmp_path, capsys):
    """name_0, name_1, ..., name_10 in numeric order after a bare name; a target named a_1 takes a_1.png itself."""
    root = dataset(tmp_path, stems=("a",), controls=0)
    for name in ("a_10", "a_2", "a", "a_0"):
        image(root / "control" / f"{name}.png", "red")
    image(root / "targets" / "a_1.png")
    (root / "targets" / "a_1.txt").write_text("other")
    image(root / "control" / "a_1.png", "red")
    output = tmp_path / "metadata.jsonl"
    code, _, err = run(["--images", root / "targets", "--control", root / "control", "--output", output], capsys)
    assert code == 0, err
    assert [r[1] for r in trained_rows(output)] == [
        [str(root / f"control/{n}.png") for n in ("a", "a_0", "a_2", "a_10")], [str(root / "control/a_1.png")]]


def test_musubi_config(tmp_path, capsys, monkeypatch):
    """[general] values reach every [[datasets]] entry (a dataset's own value wins); relative directories are the
    working directory's, as in musubi-tuner; captions may live in a caption_directory; training settings are named in
    a note, not converted."""
    monkeypatch.chdir(tmp_path)
    dataset(tmp_path / "one", musubi=True, controls=2)
    dataset(tmp_path / "two", stems=("c",))
    (tmp_path / "two" / "captions").mkdir()
    for txt in (tmp_path / "two" / "targets").glob("*.txt"):
        txt.rename(tmp_path / "two" / "captions" / f"{txt.stem}.caption")
    (tmp_path / "dataset.toml").write_text(
        '[general]\nresolution = [1024, 1024]\nbatch_size = 2\ncaption_extension = ".txt"\n\n'
        '[[datasets]]\nimage_directory = "one/targets"\ncontrol_directory = "one/control"\n'
        'cache_directory = "cache/one"\nnum_repeats = 3\n\n'
        '[[datasets]]\nimage_directory = "two/targets"\ncontrol_directory = "two/control0"\n'
        'caption_extension = ".caption"\ncaption_directory = "two/captions"\n')
    code, out, err = run(["--musubi_config", "dataset.toml", "--output", "data/metadata.csv"], capsys)
    assert code == 0, err
    rows = trained_rows("data/metadata.csv")
    assert [(Path(r[0]).name, [Path(e).name for e in r[1]], r[2]) for r in rows] == [
        ("a.png", ["a_0.png", "a_1.png"], "edit a"), ("b.png", ["b_0.png", "b_1.png"], "edit b"),
        ("c.png", ["c.jpg"], "edit c")]
    for key in ("resolution", "batch_size", "num_repeats", "cache_directory"):
        assert f"note: {key} is not converted" in out
    assert "--dataset_base_path data " in out


def test_musubi_config_refuses_keys_without_a_counterpart(tmp_path, capsys):
    (tmp_path / "dataset.toml").write_text('[[datasets]]\nimage_jsonl_file = "m.jsonl"\nmultiple_target = true\n')
    output = tmp_path / "metadata.csv"
    code, _, err = run(["--musubi_config", tmp_path / "dataset.toml", "--output", output], capsys)
    assert code == 2 and "Traceback" not in err
    assert "[[datasets]] 1: image_jsonl_file, multiple_target have no counterpart" in err
    assert "no image_directory and no control_directory" in err
    assert not output.exists()


@pytest.mark.parametrize("toml, message", [
    ('[datasets]\nimage_directory = "t"\n', "expected [[datasets]] entries (double brackets"),
    ('[[datasets]]\nimage_directory = 3\ncontrol_directory = "c"\n',
     "image_directory = 3: expected text in quotes"),
    ('[[datasets]\n', "not valid TOML"),
    ('[general]\nbatch_size = 1\n', "no [[datasets]] entry"),
])
def test_musubi_config_that_cannot_be_read(tmp_path, capsys, toml, message):
    (tmp_path / "dataset.toml").write_text(toml)
    code, _, err = run(["--musubi_config", tmp_path / "dataset.toml", "--output", tmp_path / "m.csv"], capsys)
    assert code == 2 and message in err and str(tmp_path / "dataset.toml") in err and "Traceback" not in err, err
    assert not (tmp_path / "m.csv").exists()


def _break(case, root):
    """Spoil the dataset for one error case; returns the path the message must name and a phrase of it."""
    t, c = root / "targets", root / "control0"
    if case == "no caption":
        (t / "b.txt").unlink()
        return t / "b.txt", "no caption file"
    if case == "empty caption":
        (t / "b.txt").write_text(" \n ")
        return t / "b.txt", "empty caption"
    if case == "caption not UTF-8":
        (t / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
        return t / "b.txt", "not UTF-8"
    if case == "caption without target":
        (t / "z.txt").write_text("lost")
        return t / "z.txt", "caption without a target"
    if case == "no control":
        (c / "b.jpg").unlink()
        return t / "b.png", "no control image in"
    if case == "control without target":
        image(c / "zz.png")
        return c / "zz.png", "control image without a target"
    if case == "non-image file":
        (t / "notes.docx").write_bytes(b"PK")
        return t / "notes.docx", "not an image"
    if case == "duplicate target stem":
        image(t / "b.jpg")
        return "b.jpg and b.png", "two targets named 'b'"
    if case == "duplicate control stem":
        image(c / "b.png")
        return "b.jpg and b.png", "both control of target 'b'"
    if case == "control folder missing":
        for f in c.iterdir():
            f.unlink()
        c.rmdir()
        return c, "folder not found"
    if case == "empty folder":
        for f in t.iterdir():
            f.unlink()
        for f in c.iterdir():
            f.unlink()
        return t, "holds no images"
    raise AssertionError(case)


CASES = ["no caption", "empty caption", "caption not UTF-8", "caption without target", "no control",
         "control without target", "non-image file", "duplicate target stem", "duplicate control stem",
         "control folder missing", "empty folder"]


@pytest.mark.parametrize("case", CASES)
def test_each_problem_is_named_and_nothing_is_written(tmp_path, capsys, case):
    root = dataset(tmp_path)
    named, phrase = _break(case, root)
    output = tmp_path / "out" / "metadata.csv"
    code, out, err = run(["--images", root / "targets", "--control", root / "control0", "--output", output], capsys)
    assert code == 2, out
    assert str(named) in err and phrase in err and "Traceback" not in err, err
    assert not output.exists() and not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(tmp_path, capsys):
    """A missing second control folder does not hide the problems of the first."""
    root = dataset(tmp_path, stems=("a", "b", "c"))
    _break("no caption", root)
    _break("control without target", root)
    (root / "control0" / "a.jpg").unlink()
    code, _, err = run(["--images", root / "targets", "--control", root / "control0", "--control", root / "nope",
                        "--output", tmp_path / "m.csv"], capsys)
    assert code == 2 and "4 problem(s)" in err, err
    assert "b.txt" in err and "zz.png" in err and f"{root / 'targets' / 'a.png'}: no control image" in err
    assert f"{root / 'nope'}: folder not found" in err


def test_control_folder_that_is_the_target_folder_is_refused(tmp_path, capsys):
    root = dataset(tmp_path)
    code, _, err = run(["--images", root / "targets", "--control", root / "targets", "--output",
                        tmp_path / "m.csv"], capsys)
    assert code == 2 and f"{root / 'targets'}: the control folder is the target folder" in err
    code, _, err = run(["--images", root / "targets", "--control", root / "control0", "--control",
                        root / "control0", "--output", tmp_path / "m.csv"], capsys)  # every row's image twice
    assert code == 2 and f"{root / 'control0'}: given twice as a control folder; give each control folder once" in err
    assert not (tmp_path / "m.csv").exists()


def test_a_broken_symbolic_link_is_named_not_skipped(tmp_path, capsys):
    """A dangling link to a control (musubi's second one, b_1.png) or a target was skipped as 'not a file': the
    row was written with one edit image less, without a word. It is a problem, named with its target."""
    root = dataset(tmp_path, controls=1, musubi=True)
    image(root / "control" / "a_1.png")
    (root / "control" / "b_1.png").symlink_to(tmp_path / "gone" / "b_1.png")
    (root / "targets" / "c.png").symlink_to(tmp_path / "gone" / "c.png")
    output = tmp_path / "metadata.csv"
    code, out, err = run(["--images", root / "targets", "--control", root / "control", "--output", output], capsys)
    assert code == 2 and not output.exists()
    for link in ("control/b_1.png", "targets/c.png"):
        assert (f"{root / link}: a broken symbolic link (its target {tmp_path / 'gone' / os.path.basename(link)} does "
                "not exist); restore the file it points to, or remove the link") in err
    (root / "control" / "b_1.png").unlink()
    (root / "targets" / "c.png").unlink()
    image(root / "control" / "b_1.png")
    (root / "control" / "b_2.png").symlink_to(root / "control" / "b_1.png")  # a link to a file is a file
    assert run(["--images", root / "targets", "--control", root / "control", "--output", output], capsys)[0] == 0
    assert [len(r[1]) for r in trained_rows(str(output))] == [2, 3]


def test_names_the_csv_reader_would_split_are_written_as_a_json_list(tmp_path, capsys):
    """A '|' (the edit images' separator) in a name, or a name starting with '[' (a JSON list) round-trips."""
    root = dataset(tmp_path, stems=("p|q", "[1]r"), controls=2)
    output = root / "targets" / "metadata.csv"  # the target's path starts with its name
    code, _, err = run(["--images", root / "targets", "--control", root / "control0", "--control",
                        root / "control1", "--output", output], capsys)
    assert code == 0, err
    assert [(Path(r[0]).name, [Path(e).name for e in r[1]]) for r in trained_rows(output)] == [
        ("[1]r.png", ["[1]r.jpg", "[1]r.jpg"]), ("p|q.png", ["p|q.jpg", "p|q.jpg"])]


def test_output_in_the_target_folder(tmp_path, capsys):
    """The metadata file written among the targets is not taken for a stray file when written again; a name the
    reader would strip (a leading space, beside the output) is refused by name."""
    root = dataset(tmp_path)
    output = root / "targets" / "metadata.jsonl"
    argv = ["--images", root / "targets", "--control", root / "control0", "--output", output]
    assert run(argv, capsys)[0] == 0
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert read_metadata(output)[0][1]["image"] == "a.png"
    image(root / "targets" / " c.png")
    (root / "targets" / " c.txt").write_text("edit c")
    image(root / "control0" / " c.png")
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 2 and f"{root / 'targets' / ' c.png'}: a file name the metadata cannot hold" in err
    assert len(read_metadata(output)) == 2  # the earlier file stays


def test_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    root = dataset(tmp_path)
    output = tmp_path / "metadata.csv"
    output.write_text("keep me")
    argv = ["--images", root / "targets", "--control", root / "control0", "--output", output]
    code, _, err = run(argv, capsys)
    assert code == 2 and f"--output {output} exists; pass --overwrite" in err
    assert output.read_text() == "keep me"
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert len(read_metadata(output)) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("argv, message", [
    (["--output", "m.csv"], "give --images and at least one --control folder, or --musubi_config"),
    (["--images", "t", "--output", "m.csv"], "give --images and at least one --control folder"),
    (["--musubi_config", "d.toml", "--images", "t", "--output", "m.csv"], "leave out --images and --control"),
    (["--images", "t", "--control", "c", "--output", "m.txt"], "unsupported extension '.txt'"),
])
def test_bad_flags(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    dataset(tmp_path)
    (tmp_path / "t").symlink_to(tmp_path / "targets")
    (tmp_path / "c").symlink_to(tmp_path / "control0")
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.txt").exists() and not (tmp_path / "m.csv").exists()


def test_the_printed_flags_pass_the_trainers_dry_run(tiny_models, tmp_path, capsys):
    from diffsynth.trainers import main as train

    root = dataset(tmp_path, controls=2)
    output = tmp_path / "data" / "metadata.csv"
    code, out, err = run(["--images", root / "targets", "--control", root / "control0", "--control",
                          root / "control1", "--output", output], capsys)
    assert code == 0, err
    flags = shlex.split(out.split("train with: ", 1)[1])
    code = train(flags + ["--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models,
                          "--max_pixels", "4096", "--edit_image_area", "4096", "--output_path", str(tmp_path / "run"),
                          "--lora_base_model", "dit", "--lora_rank", "4", "--dry_run"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 training samples" in err


def test_the_quickstart_command_runs_as_written(tmp_path, capsys, monkeypatch):
    """QUICKSTART.md's command, in a working directory holding its data/targets and data/controls."""
    import re

    command = next(line for line in re.findall(r"```bash\n(.*?)```", (ROOT / "QUICKSTART.md").read_text(), re.S)
                   if "folders_to_metadata.py" in line)
    tokens = shlex.split(command)
    monkeypatch.chdir(tmp_path)
    dataset(tmp_path / "data")
    (tmp_path / "data" / "control0").rename(tmp_path / "data" / "controls")
    code, out, err = run(tokens[2:], capsys)
    assert code == 0, err
    assert len(trained_rows("data/metadata.csv")) == 2
    assert "--dataset_base_path data --dataset_metadata_path data/metadata.csv" in out
