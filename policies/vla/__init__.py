"""The pi0-style vision-language-action policy: configuration and model."""

from policies.vla.configuration_vla import PRESETS, VLAConfig, parse_overrides, vla_config
from policies.vla.modeling_vla import VLAModel, VLAPolicy

__all__ = ["PRESETS", "VLAConfig", "VLAModel", "VLAPolicy", "parse_overrides", "vla_config"]
