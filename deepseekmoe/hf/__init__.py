"""transformers integration: `import deepseekmoe.hf` registers model_type "deepseek" with the Auto classes.

Afterwards `AutoConfig` / `AutoModelForCausalLM.from_pretrained(path)` load a DeepSeekMoE checkpoint in the
official HF layout (as `deepseekmoe convert --to-hf` writes it, or as deepseek-moe-16b ships it) offline and
without `trust_remote_code`; `generate()`, `save_pretrained()`, PEFT adapters and `Trainer` work on the result.
transformers itself has no DeepSeekMoE v1 model ("deepseek"; it has deepseek_v2/v3), so nothing is replaced;
registration is idempotent.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping

from .configuration import DeepseekConfig
from .modeling import DeepseekForCausalLM, DeepseekPreTrainedModel, expert_conversions

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "DeepseekPreTrainedModel"]

AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)
AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)
register_checkpoint_conversion_mapping(DeepseekConfig.model_type, expert_conversions(), overwrite=True)
