"""The MoE families of the literature as variants of the VLA, and the one place that turns a
variant name into a configured policy (``upcycle_as``).

A variant is a kind, optionally with the upcycling initialisation: ``dense``, ``vanilla``,
``adamoe``, ``adamoe-preserve``, ``thor``, ... Each kind is a set of ``MoEConfig`` fields on
top of (num_experts, top_k), plus, for some, decoding or attention options: SCMoE decodes
with self-contrast, BAM also upcycles the action expert's attention.
"""

from __future__ import annotations

from typing import Any

import torch

import adamoe
from policies.vla.modeling_vla import VLAPolicy

# Each MoE kind as MoEConfig fields on top of (num_experts, top_k). The main job runs
# vanilla and adamoe; the others are the families of the literature (make families).
FAMILIES: dict[str, dict[str, Any]] = {
    "vanilla": {"router": "topk"},
    "adamoe": {"router": "adamoe"},
    "switch": {"router": "topk", "capacity_factor": 1.25, "balance_loss": "switch"},
    "gatedrop": {"router": "topk", "gating_dropout": 0.2},
    "topany": {"router": "topany"},
    "thor": {"router": "thor", "expert_noise_std": 1e-3},
    "smear": {"router": "smear"},
    "soft": {"router": "soft"},
    "scmoe": {"router": "topk", "top_k": 2, "renormalize": True},  # + self-contrast decoding
    "lowrank": {"router": "adamoe", "expert_structure": "lowrank", "structure_rank": 32, "self_guided_steps": 100},
    "bam": {"router": "topk"},  # + soft attention experts with their own keys and values
    "bam_kv": {"router": "topk"},  # + soft attention experts sharing keys and values
}


SELF_CONTRAST = {"scmoe": 0.5}  # beta of (1 + beta) * top-2 - beta * top-1 at inference


ATTENTION_EXPERTS = {"bam": {"share_kv": False}, "bam_kv": {"share_kv": True}}  # MoAConfig fields
KINDS = ("dense", *FAMILIES)
DEMO_VARIANTS = ("dense", "vanilla", "adamoe")


def parse_variant(name: str, default_init: str) -> tuple[str, str | None]:
    """``dense``, ``vanilla``, ``adamoe``, optionally with the upcycling init (``adamoe-preserve``)."""
    kind, _, init = name.partition("-")
    if kind not in KINDS:
        raise ValueError(f"variant {name!r}: the kind must be one of {KINDS} (optionally -paper/-preserve)")
    if kind == "dense":
        if init:
            raise ValueError(f"variant {name!r}: the dense policy has no upcycling init")
        return kind, None
    init = init or default_init
    if init not in adamoe.config.INITS:
        raise ValueError(f"variant {name!r}: init {init!r} is not one of {adamoe.config.INITS}")
    return kind, init


def upcycle_as(
    policy: VLAPolicy,
    variant: str,
    default_init: str = "paper",
    num_experts: int = 4,
    top_k: int = 1,
    generator: torch.Generator | None = None,
) -> VLAPolicy:
    """Upcycle ``policy`` in place into ``variant`` (``dense`` leaves it as it is) with the
    kind's MoE layers, its decoding options and, for BAM, its attention experts."""
    kind, init = parse_variant(variant, default_init)
    if kind == "dense":
        return policy
    fields: dict[str, Any] = {"num_experts": num_experts, "top_k": top_k, **FAMILIES[kind]}
    policy.upcycle(adamoe.MoEConfig(**fields), init=init, generator=generator)
    policy.config.self_contrast_beta = SELF_CONTRAST.get(kind, 0.0)
    if kind in ATTENTION_EXPERTS:
        moa = adamoe.MoAConfig(num_experts=num_experts, **ATTENTION_EXPERTS[kind])
        policy.upcycle_attention(moa, generator=generator)
    return policy
