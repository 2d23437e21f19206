"""What the DiT is conditioned on, per sample: text embeddings, target latents, edit-image latents.

The same per-sample function feeds training directly or fills the on-disk cache, so a cached run sees exactly
the tensors an uncached run computes.
"""
import contextlib
import glob
import hashlib
import json
import os
import time
import warnings

import torch

from ..utils.image import SIZE_MULTIPLE, open_image
from ..utils.io import (
    WeightFileError, check_safetensors_file, load_safetensors, read_metadata, resolve_safetensors_files, save_safetensors,
)

# The prompt of a dropped caption (--caption_dropout_rate): the negative prompt the inference script and Qwen's
# examples use for true CFG, so a dropped-caption sample trains exactly the branch CFG's negative pass runs. The
# text encoder sees the edit images too, so this embedding is per sample.
DROPOUT_PROMPT = " "


@torch.no_grad()
def condition_sample(pipe, item, edit_files=(), dropout_prompt=False, same_row=None) -> dict:
    """item: one dataset item (image (3,H,W), edit_images [(3,h,w)...] sized for the VAE, prompt);
    edit_files: the edit images' files, which the text encoder sizes itself, as at inference -> CPU tensors.
    dropout_prompt: also the embedding of DROPOUT_PROMPT with the same edit images ("empty_prompt_emb").
    same_row: the conditioning of the same row at another --max_pixels area: its text and edit-image tensors do not
    depend on the target's size and are taken from it (the encoders run once a row); only the target is encoded."""
    image, edits = item["image"], list(item["edit_images"])
    cond = {
        "latents": pipe.encode_images(image[None])[0].cpu(),
        "shapes": [(1, image.shape[1] // SIZE_MULTIPLE, image.shape[2] // SIZE_MULTIPLE)]
                  + [(1, e.shape[1] // SIZE_MULTIPLE, e.shape[2] // SIZE_MULTIPLE) for e in edits],
    }
    if same_row is not None:
        return {**{k: same_row.get(k) for k in ("prompt_emb", "edit_latents", "empty_prompt_emb")}, **cond}
    originals = [open_image(path) for path in edit_files]

    def embed(prompt):
        emb, mask = pipe.encode_prompt([prompt], [originals] if originals else None)
        return (emb if mask is None else emb[:, : int(mask[0].sum())])[0].cpu()  # one sample: padding at the end

    cond["prompt_emb"] = embed(item["prompt"])
    cond["edit_latents"] = torch.cat([pipe.encode_images(e[None])[0] for e in edits]).cpu() if edits else None
    if dropout_prompt:
        cond["empty_prompt_emb"] = embed(DROPOUT_PROMPT)
    return cond


def collate_conditions(conds, device, dtype) -> dict:
    """Stack samples of one bucket; text is right-padded with a mask only when lengths differ."""
    shapes = {json.dumps(c["shapes"]) for c in conds}
    if len(shapes) > 1:
        raise ValueError(f"samples of one batch have different image shapes {sorted(shapes)}")
    lengths = [c["prompt_emb"].shape[0] for c in conds]
    longest = max(lengths)
    emb = torch.zeros(len(conds), longest, conds[0]["prompt_emb"].shape[-1], dtype=dtype)
    mask = torch.zeros(len(conds), longest, dtype=torch.long)
    for i, c in enumerate(conds):
        emb[i, : lengths[i]] = c["prompt_emb"]
        mask[i, : lengths[i]] = 1
    edit = None if conds[0]["edit_latents"] is None else torch.stack([c["edit_latents"] for c in conds])
    return {
        "prompt_emb": emb.to(device),
        "prompt_mask": None if min(lengths) == longest else mask.to(device),
        "latents": torch.stack([c["latents"] for c in conds]).to(device, dtype),
        "edit_latents": None if edit is None else edit.to(device, dtype),
        "shapes": [tuple(s) for s in conds[0]["shapes"]],
    }


def check_cache_path(path):
    """--cache_conditioning names a folder, made when missing: refuse a file, or a place nothing can be written."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--cache_conditioning {path} is a file; give a folder for the cache files (it is made when "
                         "missing), or leave the value out for <output_path>/cache")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--cache_conditioning {path}: {existing} is a file, so the folder cannot be made there; "
                         "choose another folder")
    from .output_dir import cannot_create_in

    why = cannot_create_in(existing)
    if why:
        raise ValueError(f"--cache_conditioning {path}: cannot write in {existing} ({why}); choose another folder")


def content_id(file) -> str:
    """A safetensors file's header and the first 4 KiB of each tensor: a retrained or replaced model differs there in
    every tensor it changed, and reading it costs milliseconds where hashing 16 GB would take minutes. From the
    content, not the mtime, so machines with their own copies of the same model agree on the cache's names."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        digest.update(header)
        for start, end in sorted(v["data_offsets"] for k, v in json.loads(header).items() if k != "__metadata__"):
            f.seek(8 + n + start)
            digest.update(f.read(min(end - start, 4096)))
    return digest.hexdigest()


def conditioning_model_files(models: dict) -> list:
    """What the cached tensors were computed from, by content: the text encoder's and VAE's weight files (see
    `content_id`), the tokenizer's and processor's files (hashed whole, they are small) and whether the DiT is an
    Edit-2511 one (its prompt template). `models` holds the trainer's model flags. Raises (WeightFileError,
    ValueError) while the files are not on disk."""
    from ..models.dit_loader import infer_dit_config  # the model code loads when used: preflight imports this module
    from ..pipelines.qwen_image import locate_model_files

    found = locate_model_files(models.get("model_id_with_origin_paths"), models.get("model_paths"),
                               models.get("models_dir"), models.get("tokenizer_path"), models.get("processor_path"),
                               download=False, need=("text_encoder", "vae"))
    dit = [found[k] for k in ("dit", "dit_merged_qkv") if k in found]
    ids = [["zero_cond_t", infer_dit_config(resolve_safetensors_files(dit[0]))["zero_cond_t"]]] if dit else []
    for kind in ("text_encoder", "vae"):
        for file in resolve_safetensors_files(found[kind]):  # a folder or index json: its files; checked complete
            ids.append([kind, os.path.basename(file), content_id(file)])
    for kind in ("tokenizer", "processor"):
        for file in sorted(glob.glob(os.path.join(glob.escape(found[kind]), "**", "*"), recursive=True)):
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    ids.append([kind, os.path.relpath(file, found[kind]), hashlib.sha256(f.read()).hexdigest()])
    return ids


class ConditionCache:
    """One safetensors file per sample, named by the dataset's content hash (files, prompt, sizes) combined with
    what else decides the tensors (`models`: the model flags, dtype and prompt template, and when the flags name
    model files, the content of the text encoder, VAE, tokenizer and processor files). A changed image, prompt or
    model, even one overwritten in place, gets a new name and is recomputed; stale files are simply never read.
    A file that cannot be read (cut short) counts as missing and is computed again."""

    TEMP_AGE_S = 3600  # a cache file is written in well under a second: an older temp file's writer is dead

    def __init__(self, folder, models: dict | None = None):
        check_cache_path(folder)
        self.folder, self.models, self._models_name = folder, dict(models or {}), None
        os.makedirs(folder, exist_ok=True)
        # Temp files of writes that killed runs never finished (atomic_path's `.tmp-*`). Other runs may share the
        # folder and be writing now: only old ones go.
        for tmp in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
            with contextlib.suppress(FileNotFoundError):  # another process of this run removed it first
                if time.time() - os.path.getmtime(tmp) > self.TEMP_AGE_S:
                    os.remove(tmp)

    def models_name(self, required=True):
        """The hash of `models` and of the model files' content; None (with required=False) while the files are
        not on disk yet, as before a first download: then no cache file can be known to be valid."""
        if self._models_name is None:
            files = []
            if {"model_id_with_origin_paths", "model_paths"} & set(self.models):  # the trainer's model flags
                try:
                    files = conditioning_model_files(self.models)
                except (ValueError, OSError):  # WeightFileError is a ValueError
                    if required:
                        raise
                    return None
            self._models_name = hashlib.sha256(json.dumps({**self.models, "files": files}, sort_keys=True,
                                                          default=str).encode()).hexdigest()
        return self._models_name

    def path(self, key):
        name = hashlib.sha256(f"{key}:{self.models_name()}".encode()).hexdigest()
        return os.path.join(self.folder, f"{name}.safetensors")

    def missing(self, samples):
        """The samples (one per cache key) without a readable cache file."""
        unique = {}
        for s in samples:
            unique.setdefault(s.cache_key, s)
        unique = list(unique.values())
        if self.models_name(required=False) is None:
            return unique
        todo, damaged = [], 0
        for s in unique:
            path = self.path(s.cache_key)
            if os.path.isfile(path):
                try:
                    check_safetensors_file(path)
                    continue
                except WeightFileError:
                    damaged += 1
            todo.append(s)
        if damaged:
            warnings.warn(f"--cache_conditioning {self.folder}: {damaged} cache file(s) cannot be read (cut short by a "
                          "full disk or a killed copy?); they are computed again", stacklevel=2)
        return todo

    def put(self, key, cond):
        tensors = {k: cond[k] for k in ("prompt_emb", "latents", "edit_latents", "empty_prompt_emb")
                   if cond.get(k) is not None}
        save_safetensors(tensors, self.path(key), {"shapes": json.dumps(cond["shapes"])})

    def get(self, key):
        path = self.path(key)
        try:
            tensors = load_safetensors(path)
        except WeightFileError as e:  # present and readable when the run started: removed or damaged since
            raise WeightFileError(f"{e}; a conditioning cache file: rerun, and the cache computes it again") from None
        return {"prompt_emb": tensors["prompt_emb"], "latents": tensors["latents"],
                "edit_latents": tensors.get("edit_latents"), "empty_prompt_emb": tensors.get("empty_prompt_emb"),
                "shapes": json.loads(read_metadata(path)["shapes"])}
