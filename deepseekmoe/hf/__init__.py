"""transformers integration: `import deepseekmoe.hf` registers model_type "deepseek" with the Auto classes.

The classes are the ones every HF export carries as remote code (`remote_code/configuration_deepseek.py`,
`remote_code/modeling_deepseek.py`, standalone on torch + transformers), so after the import `AutoConfig`,
`AutoModel`, `AutoModelForCausalLM` and `AutoModelForSequenceClassification.from_pretrained(path)` load a
DeepSeekMoE checkpoint in the official HF layout (an export, or deepseek-moe-16b as it ships) offline without
`trust_remote_code`, and give what the export's own code gives. transformers itself has no DeepSeekMoE v1 model
("deepseek"; it has deepseek_v2/v3), so nothing is replaced; registration is idempotent.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .remote_code.configuration_deepseek import DeepseekConfig
from .remote_code.modeling_deepseek import (DeepseekForCausalLM, DeepseekForSequenceClassification, DeepseekModel,
                                            DeepseekPreTrainedModel)

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "DeepseekForSequenceClassification", "DeepseekModel",
           "DeepseekPreTrainedModel"]

AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)
AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DeepseekConfig, DeepseekForSequenceClassification, exist_ok=True)
