"""A complete tiny random Qwen-Image-Edit model set in the official file layout, for tests and the demo.

    python -m diffsynth.utils.tiny_models --output DIR [--seed 0]

writes, deterministically from the seed (same file names, key layouts and config files as the real repos):

    DIR/tiny-random/Qwen-Image-Edit/transformer/   sharded DiT + index json + config.json (diffusers layout)
    DIR/tiny-random/Qwen-Image-Edit/processor/     Qwen2.5-VL processor: image processor, tokenizer, chat template
    DIR/tiny-random/Qwen-Image-Edit/scheduler/     scheduler_config.json (the real Qwen config)
    DIR/tiny-random/Qwen-Image/text_encoder/       Qwen2.5-VL, sharded, official (older) key layout + config.json
    DIR/tiny-random/Qwen-Image/vae/                AutoencoderKLQwenImage + config.json
    DIR/tiny-random/Qwen-Image/tokenizer/          byte-level BPE Qwen2 tokenizer with the Qwen special tokens

The models load through the same code as the real ones. The whole set is built in a temporary folder and moved
into place at the end, so an interrupted run never leaves a partial set behind. `reference_pipeline` builds
diffusers' own Qwen-Image pipelines over a set: the numerical oracle the tests compare against.
"""
import importlib.util
import json
import os
import re
import shutil
import tempfile

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from huggingface_hub import split_torch_state_dict_into_shards
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from diffsynth.models.qwen_image_text_encoder import (
    EDIT_PLUS_IMAGE,
    EDIT_TEMPLATE,
    T2I_TEMPLATE,
    to_official_layout,
)
from diffsynth.utils.cli import ArgumentParser
from diffsynth.utils.io import save_safetensors, write_json_atomic

TINY_DIT_CONFIG = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
                       joint_attention_dim=64, in_channels=64, out_channels=16)

# Qwen2's special tokens, in the real tokenizer's order (there they follow the 151643 regular tokens).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Words the tiny BPE learns whole. With the prompt templates among them, each template's system prompt is
# 34 / 64 tokens long, as with the real tokenizer, so the pipelines' drop counts cut exactly the system prompt.
EXTRA_CORPUS = [
    "You are a helpful assistant.", "Picture 1: Picture 2: Picture 3: ", "a cat wearing a red hat",
    "make the sky blue and add a dog", "turn it into an oil painting", "a photo of a house in the snow",
]

# Qwen2-VL's chat template (the processor's): system turn, then user turns with images/videos and text.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The real Qwen-Image scheduler config (FlowMatchEulerDiscreteScheduler, exponential dynamic shift).
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential",
    "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

IMAGE_MEAN, IMAGE_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2  # the real vision tower's; keeps the processor real too


def _train_bpe() -> tuple[dict, list]:
    """A byte-level BPE (Qwen2's pre-tokenizer) trained on the templates: all 256 bytes plus learnt merges."""
    specials = "|".join(map(re.escape, SPECIAL_TOKENS + ["{}"]))
    corpus = [piece for t in (T2I_TEMPLATE, EDIT_TEMPLATE, EDIT_PLUS_IMAGE) for piece in re.split(specials, t) if piece]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus + EXTRA_CORPUS, trainer)
    bpe = json.loads(tokenizer.to_str())["model"]
    return bpe["vocab"], bpe["merges"]


def write_tokenizer(out: str) -> int:
    """vocab.json, merges.txt and the tokenizer configs, as in `Qwen/Qwen-Image:tokenizer/`; returns its size."""
    vocab, merges = _train_bpe()
    special_ids = {token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)}
    write_json_atomic(vocab, os.path.join(out, "vocab.json"))
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for t, i in special_ids.items()}
    write_json_atomic({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, os.path.join(out, "tokenizer_config.json"))
    write_json_atomic(special_ids, os.path.join(out, "added_tokens.json"))
    write_json_atomic({"additional_special_tokens": SPECIAL_TOKENS[1:], "eos_token": "<|im_end|>",
                       "pad_token": "<|endoftext|>"}, os.path.join(out, "special_tokens_map.json"))
    return len(vocab) + len(SPECIAL_TOKENS)


def write_processor(out: str, tokenizer_dir: str):
    """`Qwen/Qwen-Image-Edit:processor/`: the tokenizer files, the image processor config and the chat template."""
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    write_json_atomic({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }, os.path.join(out, "preprocessor_config.json"))
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


def text_encoder_config(vocab_size: int, tokenizer_dir: str) -> dict:
    """The official config.json format (flat text fields + vision_config), at tiny size."""
    with open(os.path.join(tokenizer_dir, "added_tokens.json")) as f:
        ids = json.load(f)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu", "hidden_size": TINY_DIT_CONFIG["joint_attention_dim"], "initializer_range": 0.02,
        "intermediate_size": 128, "max_position_embeddings": 128000, "max_window_layers": 2,
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        # mrope sections (t, h, w) sum to head_dim / 2 = 16, like (16, 24, 24) for the real head_dim 128
        "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "use_sliding_window": False,
        # the model's vocab is padded past the tokenizer's, as the real 152064 > 151665
        "vocab_size": (vocab_size + 63) // 64 * 64,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vision_config": {
            "model_type": "qwen2_5_vl", "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
            "num_heads": 2, "in_chans": 3, "out_hidden_size": TINY_DIT_CONFIG["joint_attention_dim"],
            "patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE, "spatial_patch_size": PATCH_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE, "window_size": 112, "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    }


def write_sharded(state_dict: dict, out: str, prefix: str, max_shard_size: str):
    """Shards named `<prefix>-0000i-of-0000N.safetensors` plus `<prefix>.safetensors.index.json`."""
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=prefix + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_safetensors({k: state_dict[k] for k in keys}, os.path.join(out, filename), metadata={"format": "pt"})
    write_json_atomic({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                      os.path.join(out, prefix + ".safetensors.index.json"))


def write_text_encoder(out: str, config: dict, seed: int):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    state_dict = {to_official_layout(k): v for k, v in model.state_dict().items()}
    write_sharded(state_dict, out, "model", max_shard_size="400KB")
    write_json_atomic(config, os.path.join(out, "config.json"))


def write_transformer(out: str, seed: int):
    torch.manual_seed(seed)
    # diffusers' default init zeroes no layer (proj_out and norm_out included), so predictions depend on the
    # inputs and pipeline bugs show; tests/test_tiny_models.py checks it.
    model = QwenImageTransformer2DModel(**TINY_DIT_CONFIG)
    model.save_pretrained(out, max_shard_size="500KB", safe_serialization=True)


def write_vae(out: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    # Non-trivial per-channel statistics, so a pipeline that skips the (de)normalisation gives a different image.
    mean = [round(x * 2 - 1, 4) for x in torch.rand(16, generator=generator).tolist()]
    std = [round(x * 2.5 + 0.5, 4) for x in torch.rand(16, generator=generator).tolist()]
    torch.manual_seed(seed)
    # The real layout (dim_mult 1,2,4,4: 8x spatial, causal in time) at width 8 instead of 96; z_dim must stay 16.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    vae.save_pretrained(out, safe_serialization=True)


def write_tiny_models(output_dir, seed: int = 0) -> dict:
    """Write the set under `output_dir/tiny-random/`; returns the path of each component folder (and "root")."""
    root = os.path.join(output_dir, "tiny-random")
    layout = {
        "transformer": "Qwen-Image-Edit/transformer", "processor": "Qwen-Image-Edit/processor",
        "scheduler": "Qwen-Image-Edit/scheduler", "text_encoder": "Qwen-Image/text_encoder",
        "vae": "Qwen-Image/vae", "tokenizer": "Qwen-Image/tokenizer",
    }
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tiny-random-", dir=output_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the set is an ordinary folder once moved into place
    try:
        paths = {name: os.path.join(tmp, sub) for name, sub in layout.items()}
        for path in paths.values():
            os.makedirs(path)
        vocab_size = write_tokenizer(paths["tokenizer"])
        write_processor(paths["processor"], paths["tokenizer"])
        write_json_atomic(SCHEDULER_CONFIG, os.path.join(paths["scheduler"], "scheduler_config.json"))
        # A different seed per component: each is reproducible on its own, and none shares weights with another.
        write_text_encoder(paths["text_encoder"], text_encoder_config(vocab_size, paths["tokenizer"]), seed)
        write_transformer(paths["transformer"], seed + 1)
        write_vae(paths["vae"], seed + 2)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"root": root, **{name: os.path.join(root, sub) for name, sub in layout.items()}}


class _ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """transformers' Qwen2.5-VL processor without its video processor, which cannot exist without torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def reference_processor(path):
    """transformers' Qwen2.5-VL processor for `path`, the object diffusers' Edit pipelines call.

    AutoProcessor also builds the video processor, which needs torchvision even when only images are processed
    (huggingface/transformers#48558). Without torchvision the same processor class is built from its image
    processor and tokenizer, the video processor left out.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    return _ImageOnlyQwenVLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(path, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        video_processor=None,
        chat_template=CHAT_TEMPLATE,
    )


def reference_pipeline(paths: dict, kind: str = "edit"):
    """diffusers' own pipeline over a tiny set (the numerical oracle of the tests), every component loaded with
    diffusers' and transformers' own from_pretrained. `kind`: 'edit', 'edit-plus' or 'qwen-image'.
    """
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(paths["scheduler"]),
        vae=AutoencoderKLQwenImage.from_pretrained(paths["vae"]),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["text_encoder"]),
        tokenizer=AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True),
        transformer=QwenImageTransformer2DModel.from_pretrained(paths["transformer"]),
    )
    if kind == "qwen-image":
        return QwenImagePipeline(**components)
    pipeline_class = {"edit": QwenImageEditPipeline, "edit-plus": QwenImageEditPlusPipeline}[kind]
    return pipeline_class(processor=reference_processor(paths["processor"]), **components)


def main(argv=None):
    parser = ArgumentParser(description="Write a tiny random Qwen-Image-Edit model set (official layout).")
    parser.add_argument("--output", required=True, help="folder that receives tiny-random/Qwen-Image{,-Edit}/...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_models(args.output, seed=args.seed)
    print(f"wrote the tiny model set to {paths['root']}")


if __name__ == "__main__":
    main()
