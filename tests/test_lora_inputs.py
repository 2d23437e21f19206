"""Damaged or unusual LoRA files: each is refused with one line naming the file and what is wrong, or read right."""
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_DIT
from diffsynth.lora import LoraError, convert_lora_file, read_lora, save_lora
from diffsynth.lora.adapters import read_adapters
from diffsynth.models import QwenImageDiT
from test_lora import random_lora


@pytest.fixture(scope="module")
def lora():
    return random_lora(QwenImageDiT(**TINY_DIT), targets=("to_q", "to_k"))


def test_fp8_lora_reads_and_converts(tmp_path, lora):
    path = tmp_path / "fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in lora.items()}, str(path))
    got = read_lora(path)
    assert got.keys() == lora.keys() and all(v.dtype == torch.float8_e4m3fn for v in got.values())
    convert_lora_file(path, tmp_path / "merged.safetensors", "to_merged")
    assert (tmp_path / "merged.safetensors").exists()


def test_rank_zero_is_refused(tmp_path, lora):
    empty = {k: (v[:0] if k.endswith("lora_A.weight") else v[:, :0]) for k, v in lora.items()}
    with pytest.raises(LoraError, match=r"to_q has rank 0 \(lora_A \(0, 64\)\)"):
        read_lora(empty)
    path = tmp_path / "rank0meta.safetensors"
    save_lora(lora, str(path), rank=4, alpha=4, target_modules="to_q,to_k", architecture="standard")
    from diffsynth.utils.io import load_safetensors, read_metadata, save_safetensors

    save_safetensors(load_safetensors(str(path)), str(path), {**read_metadata(str(path)), "rank": "0"})
    with pytest.raises(LoraError, match=rf"{path}: metadata field 'rank' is '0'"):
        read_lora(path)


@pytest.mark.parametrize("field,value", [("alpha", "abc"), ("alpha", "nan"), ("rank", "inf")])
def test_bad_metadata_alpha_names_the_field(tmp_path, lora, field, value):
    from diffsynth.utils.io import load_safetensors, read_metadata, save_safetensors

    path = tmp_path / "meta.safetensors"
    save_lora(lora, str(path), rank=4, alpha=4, target_modules="to_q,to_k", architecture="standard")
    save_safetensors(load_safetensors(str(path)), str(path), {**read_metadata(str(path)), field: value})
    with pytest.raises(LoraError, match=rf"{path}: metadata field '{field}' is '{value}'"):
        read_lora(path)


@pytest.mark.parametrize("alpha", [torch.tensor([4.0, 4.0]), torch.tensor(float("nan"))])
def test_bad_alpha_tensor_names_the_key(tmp_path, lora, alpha):
    path = tmp_path / "alpha.safetensors"
    save_file({**lora, "transformer_blocks.0.attn.to_q.alpha": alpha}, str(path))
    with pytest.raises(LoraError, match=rf"{path}: transformer_blocks.0.attn.to_q.alpha must be one finite number"):
        read_lora(path)


def test_peft_save_pretrained_keys_load(tmp_path, lora):
    got = read_lora({f"base_model.model.{k}": v for k, v in lora.items()})
    assert got.keys() == lora.keys() and all(torch.equal(got[k], lora[k]) for k in lora)


def test_folder_named_like_a_lora(tmp_path):
    folder = tmp_path / "somedir.safetensors"
    folder.mkdir()
    for read in (read_lora, read_adapters):
        with pytest.raises(LoraError, match=rf"{folder}: is a folder; give the .safetensors file inside it"):
            read(folder)


@pytest.mark.parametrize("field,value", [("modelspec.architecture", "flux-1-dev/lora"),
                                         ("ss_base_model_version", "sdxl_base_v1-0"),
                                         ("ss_base_model_version", "sd_v1")])
def test_metadata_naming_another_base_model_is_refused(tmp_path, lora, field, value):
    path = tmp_path / "other.safetensors"
    save_file(lora, str(path), metadata={field: value})
    for read in (read_lora, read_adapters):
        with pytest.raises(LoraError, match=rf"{path}: metadata field '{field}' is '{value}': a LoRA for another "
                                            "model, not Qwen-Image"):
            read(path)


def test_metadata_naming_qwen_image_reads(tmp_path, lora):
    path = tmp_path / "musubi.safetensors"
    save_file(lora, str(path), metadata={"modelspec.architecture": "Qwen-Image-Edit/lora",
                                         "ss_base_model_version": "qwen_image"})
    assert read_lora(path).keys() == lora.keys()
