"""Fine-tuning and adapting pretrained models: LoRA, bottleneck adapters, what stays
trainable (`AdaptConfig`, `apply_adaptation`) and adapter-only weights.

Sits above `multimodal.models` and below `multimodal.tasks`: every task takes
`adapt: AdaptConfig | None`.
"""

from multimodal.adapt.adapters import Adapter, AdapterConfig, add_adapters
from multimodal.adapt.config import AdaptConfig, AdaptReport, apply_adaptation
from multimodal.adapt.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    lora_layers,
    merge_lora,
    merged_state_dict,
    name_matches,
    unmerge_lora,
)
from multimodal.adapt.state import adapter_state_dict, load_adapter, read_adapter, save_adapter

__all__ = [
    "AdaptConfig",
    "AdaptReport",
    "Adapter",
    "AdapterConfig",
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "add_adapters",
    "add_lora",
    "apply_adaptation",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "merged_state_dict",
    "name_matches",
    "read_adapter",
    "save_adapter",
    "unmerge_lora",
]
