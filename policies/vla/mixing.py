"""Mixing VLA specialists into one sparse policy: BAM's last step (Zhang et al., arXiv
2408.08274), on the action expert.

Branch: copies of one pretrained dense policy are fine-tuned on different tasks (the
specialists). Mix: at every depth of the action expert, specialist ``e``'s FFN becomes
routed expert ``e`` of an MoE layer (Branch-Train-MiX) and its attention becomes
attention expert ``e`` of a soft mixture of attention (BAM); every other parameter
(the prefix, the embeddings, the norms) is the specialists' average. The normalisation
statistics must be equal: each expert expects the inputs it was trained on. The routers
start small and random; fine-tune the mixture next.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

import adamoe
from adamoe import MoAConfig, MoEConfig
from policies.normalize import Normalizer
from policies.vla.modeling_vla import VLAPolicy


def mix_specialists(
    specialists: Sequence[VLAPolicy],
    moe_config: MoEConfig | None = None,
    attention_config: MoAConfig | None = None,
    mix_ffn: bool = True,
    mix_attention: bool = True,
    generator: torch.Generator | None = None,
) -> VLAPolicy:
    """One policy from ``E`` dense specialists of one architecture (see the module).

    ``moe_config`` (``num_experts == E``; default: top-2 softmax routing renormalised over
    the chosen pair, as Branch-Train-MiX and Mixtral, no shared expert, routed coefficient
    1) and ``attention_config`` (default: ``E`` soft attention experts with their own keys
    and values) shape the layers; ``mix_ffn=False`` or ``mix_attention=False`` averages
    that part instead. Shared experts, if the config asks for them, start as the
    specialists' averaged FFN.
    """
    if not mix_ffn and not mix_attention:
        raise ValueError("nothing to mix: mix_ffn and mix_attention are both False (use adamoe.merge to average)")
    specialists = list(specialists)
    n = len(specialists)
    if n < 2:
        raise ValueError(f"mixing needs at least 2 specialists, got {n}")
    for i, policy in enumerate(specialists):
        if not isinstance(policy, VLAPolicy):
            raise ValueError(f"specialist {i} is a {type(policy).__name__}, not a VLAPolicy")
    reference = _template(specialists[0].config)
    for i, policy in enumerate(specialists):
        if policy.config.moe is not None or policy.config.attention_moe is not None:
            raise ValueError(f"specialist {i} is already upcycled; specialists must be dense policies")
        differing = sorted(k for k, v in _template(policy.config).items() if reference.get(k) != v)
        if differing:
            raise ValueError(
                f"specialist {i} differs from specialist 0 in {differing}: specialists must share one architecture"
            )
        first = dict(specialists[0].named_modules())
        for name, module in policy.named_modules():  # each expert expects the inputs it was trained on
            if isinstance(module, Normalizer) and not all(
                torch.equal(a, b) for a, b in zip(module.buffers(), first[name].buffers(), strict=True)
            ):
                raise ValueError(
                    f"specialist {i}'s normalisation statistics ({name}) differ from specialist 0's: branch the "
                    "specialists from one policy and keep its statistics"
                )
    if moe_config is None:
        moe_config = MoEConfig(
            num_experts=n, top_k=min(2, n), num_shared_experts=0, router="topk", renormalize=True, routed_coef=1.0
        )
    attention_config = MoAConfig(num_experts=n) if attention_config is None else attention_config
    for name, cfg, used in (("moe_config", moe_config, mix_ffn), ("attention_config", attention_config, mix_attention)):
        if used and cfg.num_experts != n:
            raise ValueError(f"{name}.num_experts={cfg.num_experts} but there are {n} specialists: one expert each")

    mixed = copy.deepcopy(specialists[0])
    # Every tensor averaged; the mixed parts' averages are replaced by experts below.
    mixed.load_state_dict(adamoe.merge([p.state_dict() for p in specialists], "average"))
    layers = [p.model.action_expert.layers for p in specialists]
    for depth, layer in enumerate(mixed.model.action_expert.layers):
        if mix_ffn:
            shared = [copy.deepcopy(layer.mlp) for _ in range(moe_config.num_shared_experts)]
            layer.mlp = adamoe.MoEFeedForward.from_experts(
                [stack[depth].mlp for stack in layers], copy.deepcopy(moe_config), shared, generator
            )
        if mix_attention:
            experts = adamoe.MixtureOfAttention.from_specialists(
                [stack[depth].projections() for stack in layers], mixed.config.num_heads, attention_config, generator
            )
            layer.upcycle_attention(experts)
    if mix_ffn:
        names = [f"model.action_expert.layers.{i}.mlp" for i in range(mixed.config.depth)]
        mixed.config.moe = {"config": moe_config.to_dict(), "init": "specialists", "layers": names}
    if mix_attention:
        names = [f"model.action_expert.layers.{i}.attention_experts" for i in range(mixed.config.depth)]
        mixed.config.attention_moe = {"config": attention_config.to_dict(), "layers": names}
    return mixed.eval()


def _template(config) -> dict:
    """The architecture part of a config (what mixing requires to match)."""
    data = config.to_dict()
    return {k: v for k, v in data.items() if k not in ("moe", "attention_moe")}
