"""The conditioning cache: keyed by the model files' content, damaged files recomputed, a bad folder refused."""
import glob
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL_IDS
from diffsynth.trainers import main
from diffsynth.trainers.conditioning import ConditionCache, check_cache_path
from diffsynth.trainers.dataset import Sample
from test_trainer import flags


def model_flags(models_dir, **extra):
    """The model part of what the trainer passes to ConditionCache."""
    return {"model_id_with_origin_paths": TINY_MODEL_IDS, "model_paths": None, "models_dir": models_dir,
            "tokenizer_path": None, "processor_path": None, "edit_plus": None, "dtype": "torch.bfloat16", **extra}


@pytest.fixture
def models(tiny_models, tmp_path):
    """A private copy of the tiny models, to overwrite in place."""
    return str(shutil.copytree(tiny_models, tmp_path / "models"))


def overwrite_in_place(file):
    """Same names, shapes and byte size, other weights: a retrained model saved over the old one."""
    tensors = load_file(file)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, file)


def sample(key):
    return Sample("row 1 (line 2)", "a.png", (), "x", (16, 16), (), key)


COND = {"prompt_emb": torch.ones(3, 4), "latents": torch.zeros(16, 2, 2), "edit_latents": None, "shapes": [(1, 1, 1)]}


@pytest.mark.parametrize("part", ["Qwen-Image/vae/diffusion_pytorch_model.safetensors",
                                  "Qwen-Image/text_encoder/model-00002-of-00003.safetensors",
                                  "Qwen-Image/tokenizer/vocab.json"])
def test_a_model_file_overwritten_in_place_renames_the_cache(models, tmp_path, part):
    cache = str(tmp_path / "cache")
    before = ConditionCache(cache, model_flags(models)).path("k")
    file = os.path.join(models, "tiny-random", part)
    os.utime(file, (1, 1))  # a new mtime alone (a copy) keeps the names: machines with own copies agree
    assert ConditionCache(cache, model_flags(models)).path("k") == before
    if file.endswith(".safetensors"):
        overwrite_in_place(file)
    else:
        with open(file, "a") as f:
            f.write(" ")
    assert ConditionCache(cache, model_flags(models)).path("k") != before


def test_models_not_on_disk_yet_leave_every_sample_missing(tmp_path):
    cache = ConditionCache(str(tmp_path / "cache"), model_flags(str(tmp_path / "nothing here")))
    assert cache.missing([sample("a"), sample("b"), sample("a")]) == [sample("a"), sample("b")]
    with pytest.raises(ValueError, match="no file matches"):  # writing needs the files, as the loader does
        cache.path("a")


def test_a_cut_cache_file_is_missing_again_and_old_temp_files_go(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    old, fresh = folder / ".tmp-abc-x.safetensors", folder / ".tmp-def-y.safetensors"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * ConditionCache.TEMP_AGE_S,) * 2)
    cache = ConditionCache(str(folder), {"dtype": "torch.float32"})
    assert not old.exists() and fresh.exists()  # a fresh one may be another run's write in progress
    cache.put("a", COND)
    cache.put("b", COND)
    assert cache.missing([sample("a"), sample("b")]) == []
    data = open(cache.path("b"), "rb").read()
    with open(cache.path("b"), "wb") as f:
        f.write(data[:-5])
    with pytest.warns(UserWarning, match="1 cache file\\(s\\) cannot be read .* computed again"):
        assert cache.missing([sample("a"), sample("b")]) == [sample("b")]
    with pytest.raises(ValueError, match="not a readable safetensors file .*rerun, and the cache computes it again"):
        cache.get("b")
    cache.put("b", COND)
    assert torch.equal(cache.get("b")["prompt_emb"], COND["prompt_emb"])


def test_check_cache_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--cache_conditioning .*file is a file; give a folder"):
        check_cache_path(str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"--cache_conditioning .*file/cache: .*file is a file, so the folder cannot"):
        check_cache_path(str(tmp_path / "file" / "cache"))
    check_cache_path(str(tmp_path / "new" / "cache"))  # made when missing
    assert not (tmp_path / "new").exists()
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write in .*ro \\(Permission denied\\)"):
            check_cache_path(str(tmp_path / "ro" / "cache"))


def test_trainer_refuses_a_cache_path_that_is_a_file_before_models_load(tiny_models, data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--max_steps", "1",
                      "--cache_conditioning", str(tmp_path / "file"))) == 2
    err = capsys.readouterr().err
    assert "error: --cache_conditioning" in err and "is a file; give a folder" in err and "Traceback" not in err
    # the dry run checks it too
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--dry_run",
                      "--cache_conditioning", str(tmp_path / "file"))) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_training_recomputes_the_cache_after_the_vae_is_overwritten(models, data, tmp_path):
    cache = str(tmp_path / "cache")
    run = lambda out: main(flags(models, data, str(tmp_path / out), "--max_steps", "1", "--cache_conditioning", cache))
    assert run("a") == 0
    first = set(glob.glob(os.path.join(cache, "*.safetensors")))
    assert len(first) == 2  # the two samples
    assert run("b") == 0
    assert set(glob.glob(os.path.join(cache, "*.safetensors"))) == first  # complete: reused
    overwrite_in_place(os.path.join(models, "tiny-random/Qwen-Image/vae/diffusion_pytorch_model.safetensors"))
    assert run("c") == 0
    after = set(glob.glob(os.path.join(cache, "*.safetensors")))
    assert len(after) == 4 and first < after  # computed again under new names
