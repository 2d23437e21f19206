"""LoRA for the Qwen-Image DiT in both layouts (separate q/k/v or merged to_qkv): inject, save, load, read every
common format, fuse/unfuse, and convert exactly between layouts and formats."""
from diffsynth.lora.convert import (
    DEFAULT_FORMAT, FORMATS, convert_lora_file, is_lora_file, lora_deltas, lora_to_merged, lora_to_standard, to_format,
)
from diffsynth.lora.fuse import fuse_lora, unfuse_lora
from diffsynth.lora.inject import inject_lora, load_lora_weights, lora_state_dict, parse_target_modules, save_lora
from diffsynth.lora.reader import LoraError, lora_architecture, read_lora

__all__ = [
    "DEFAULT_FORMAT", "FORMATS", "LoraError", "convert_lora_file", "fuse_lora", "inject_lora", "is_lora_file",
    "load_lora_weights", "lora_architecture", "lora_deltas", "lora_state_dict", "lora_to_merged", "lora_to_standard",
    "parse_target_modules", "read_lora", "save_lora", "to_format", "unfuse_lora",
]
