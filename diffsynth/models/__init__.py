from .dit_loader import infer_dit_config, iter_dit_state_dict, load_qwen_image_dit
from .qwen_image_dit import QwenImageDiT
from .qwen_image_dit_merged_qkv import QwenImageDiTMergedQKV, merge_qkv_state_dict, split_qkv_state_dict

__all__ = ["QwenImageDiT", "QwenImageDiTMergedQKV", "load_qwen_image_dit", "infer_dit_config",
           "iter_dit_state_dict", "merge_qkv_state_dict", "split_qkv_state_dict"]
