"""What the DiT is conditioned on, per sample: text embeddings, target latents, edit-image latents.

The same per-sample function feeds training directly or fills the on-disk cache, so a cached run sees exactly
the tensors an uncached run computes.
"""
import hashlib
import json
import os

import torch

from ..utils.image import SIZE_MULTIPLE, open_image
from ..utils.io import load_safetensors, read_metadata, save_safetensors

# The prompt of a dropped caption (--caption_dropout_rate): the negative prompt the inference script and Qwen's
# examples use for true CFG, so a dropped-caption sample trains exactly the branch CFG's negative pass runs. The
# text encoder sees the edit images too, so this embedding is per sample.
DROPOUT_PROMPT = " "


@torch.no_grad()
def condition_sample(pipe, item, edit_files=(), dropout_prompt=False) -> dict:
    """item: one dataset item (image (3,H,W), edit_images [(3,h,w)...] sized for the VAE, prompt);
    edit_files: the edit images' files, which the text encoder sizes itself, as at inference -> CPU tensors.
    dropout_prompt: also the embedding of DROPOUT_PROMPT with the same edit images ("empty_prompt_emb")."""
    image, edits = item["image"], list(item["edit_images"])
    originals = [open_image(path) for path in edit_files]

    def embed(prompt):
        emb, mask = pipe.encode_prompt([prompt], [originals] if originals else None)
        return (emb if mask is None else emb[:, : int(mask[0].sum())])[0].cpu()  # one sample: padding at the end

    cond = {
        "prompt_emb": embed(item["prompt"]),
        "latents": pipe.encode_images(image[None])[0].cpu(),
        "edit_latents": torch.cat([pipe.encode_images(e[None])[0] for e in edits]).cpu() if edits else None,
        "shapes": [(1, image.shape[1] // SIZE_MULTIPLE, image.shape[2] // SIZE_MULTIPLE)]
                  + [(1, e.shape[1] // SIZE_MULTIPLE, e.shape[2] // SIZE_MULTIPLE) for e in edits],
    }
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


class ConditionCache:
    """One safetensors file per sample, named by the dataset's content hash (files, prompt, sizes) combined with
    what else decides the tensors (`models`: the model files, dtype and prompt template). A changed image,
    prompt or model gets a new name and is recomputed; stale files are simply never read."""

    def __init__(self, folder, models: dict | None = None):
        self.folder = folder
        self.models = hashlib.sha256(json.dumps(models or {}, sort_keys=True, default=str).encode()).hexdigest()
        os.makedirs(folder, exist_ok=True)

    def path(self, key):
        name = hashlib.sha256(f"{key}:{self.models}".encode()).hexdigest()
        return os.path.join(self.folder, f"{name}.safetensors")

    def missing(self, samples):
        seen, todo = set(), []
        for s in samples:
            if s.cache_key not in seen and not os.path.isfile(self.path(s.cache_key)):
                todo.append(s)
            seen.add(s.cache_key)
        return todo

    def put(self, key, cond):
        tensors = {k: cond[k] for k in ("prompt_emb", "latents", "edit_latents", "empty_prompt_emb")
                   if cond.get(k) is not None}
        save_safetensors(tensors, self.path(key), {"shapes": json.dumps(cond["shapes"])})

    def get(self, key):
        path = self.path(key)
        tensors = load_safetensors(path)
        return {"prompt_emb": tensors["prompt_emb"], "latents": tensors["latents"],
                "edit_latents": tensors.get("edit_latents"), "empty_prompt_emb": tensors.get("empty_prompt_emb"),
                "shapes": json.loads(read_metadata(path)["shapes"])}
