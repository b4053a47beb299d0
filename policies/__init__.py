"""Policy models (VLA, Decision Transformer), their training, evaluation and control loop."""

from policies.dt import DecisionTransformer, DecisionTransformerConfig, DTTask
from policies.pretrained import POLICIES, PretrainedPolicy, from_pretrained
from policies.vla import VLAConfig, VLAPolicy, vla_config

__all__ = [
    "POLICIES",
    "DTTask",
    "DecisionTransformer",
    "DecisionTransformerConfig",
    "PretrainedPolicy",
    "VLAConfig",
    "VLAPolicy",
    "from_pretrained",
    "vla_config",
]
