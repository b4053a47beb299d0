"""The Decision Transformer: configuration, model, data, training, evaluation, merging."""

from policies.dt.configuration_dt import DecisionTransformerConfig, DTTask
from policies.dt.modeling_dt import DecisionTransformer, DTOutput

__all__ = ["DTOutput", "DTTask", "DecisionTransformer", "DecisionTransformerConfig"]
