"""The pi0-style vision-language-action policy: configuration, model, and mixing specialists."""

from policies.vla.configuration_vla import PRESETS, VLAConfig, parse_overrides, vla_config
from policies.vla.mixing import mix_specialists
from policies.vla.model import VLAModel
from policies.vla.modeling_vla import VLAPolicy

__all__ = ["PRESETS", "VLAConfig", "VLAModel", "VLAPolicy", "mix_specialists", "parse_overrides", "vla_config"]
