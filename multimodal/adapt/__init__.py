"""Fine-tuning and adapting pretrained models: LoRA, bottleneck adapters, prefix and prompt
tuning, what stays trainable (`AdaptConfig`, `apply_adaptation`), adapter-only weights,
layer-wise learning-rate decay (`layer_depths`, used by `OptimConfig.layer_decay`) and gradual
unfreezing (`GradualUnfreezing`), and the losses and frozen teacher of distillation
(`multimodal.tasks.ClipDistillation` and the others use them).

Sits above `multimodal.models` and below `multimodal.tasks`: every task takes
`adapt: AdaptConfig | None`.
"""

from multimodal.adapt.adapters import Adapter, AdapterConfig, add_adapters
from multimodal.adapt.config import AdaptConfig, AdaptReport, apply_adaptation
from multimodal.adapt.distill import (
    DistillConfig,
    FrozenTeacher,
    clip_distill_loss,
    feature_distill_loss,
    load_teacher,
    soft_target_loss,
)
from multimodal.adapt.layer_decay import layer_depths
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
from multimodal.adapt.prefix import PrefixConfig, add_prefixes
from multimodal.adapt.prompt import PromptConfig, add_prompts
from multimodal.adapt.state import adapter_state_dict, load_adapter, read_adapter, save_adapter
from multimodal.adapt.unfreeze import GradualUnfreezing

__all__ = [
    "AdaptConfig",
    "AdaptReport",
    "Adapter",
    "AdapterConfig",
    "DistillConfig",
    "FrozenTeacher",
    "GradualUnfreezing",
    "LoRAConfig",
    "LoRALinear",
    "PrefixConfig",
    "PromptConfig",
    "adapter_state_dict",
    "add_adapters",
    "add_lora",
    "add_prefixes",
    "add_prompts",
    "apply_adaptation",
    "clip_distill_loss",
    "feature_distill_loss",
    "layer_depths",
    "load_adapter",
    "load_teacher",
    "lora_layers",
    "merge_lora",
    "merged_state_dict",
    "name_matches",
    "read_adapter",
    "save_adapter",
    "soft_target_loss",
    "unmerge_lora",
]
