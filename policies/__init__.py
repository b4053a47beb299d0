"""Policy models (VLA, Decision Transformer), their training, evaluation and control loop."""

from policies.pretrained import POLICIES, PretrainedPolicy, from_pretrained
from policies.vla import VLAConfig, VLAPolicy, vla_config

__all__ = ["POLICIES", "PretrainedPolicy", "VLAConfig", "VLAPolicy", "from_pretrained", "vla_config"]
