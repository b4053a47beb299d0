"""Generic model surgery for Mixture-of-Experts policies (torch only).

The AdaMoE layer (arXiv 2510.14300): a decoupled router (which experts) and scale
adapter (how much), sparse dispatch backends, and upcycling of dense FFNs; the diagonal
Fisher information of a model, and merging of models (averages, Fisher-weighted, task
arithmetic, TIES).
"""

from adamoe.attention import MixtureOfAttention, MoAConfig
from adamoe.compression import CompressedExperts, compress_experts
from adamoe.config import MoEConfig
from adamoe.dispatch import BACKENDS, Routing, dispatch, select_backend
from adamoe.experts import FeedForward, GroupedExperts, ffn_weights
from adamoe.fisher import fisher_diagonal, fisher_metadata, load_fisher, save_fisher
from adamoe.merging import MergePlan, merge
from adamoe.moe import MoEFeedForward
from adamoe.moe_model import (
    active_parameters,
    consistency_coef,
    moe_aux_loss,
    moe_layers,
    router_parameters,
    routing_top_k,
)
from adamoe.routers import TopKRouter, balance_loss, router_z_loss
from adamoe.routing_stats import record_routing, reset_routing_stats, routing_stats
from adamoe.upcycle import UpcycleReport, upcycle

__all__ = [
    "BACKENDS",
    "CompressedExperts",
    "FeedForward",
    "GroupedExperts",
    "MergePlan",
    "MixtureOfAttention",
    "MoAConfig",
    "MoEConfig",
    "MoEFeedForward",
    "Routing",
    "TopKRouter",
    "UpcycleReport",
    "active_parameters",
    "balance_loss",
    "compress_experts",
    "consistency_coef",
    "dispatch",
    "ffn_weights",
    "fisher_diagonal",
    "fisher_metadata",
    "load_fisher",
    "merge",
    "moe_aux_loss",
    "moe_layers",
    "record_routing",
    "reset_routing_stats",
    "router_parameters",
    "router_z_loss",
    "routing_stats",
    "routing_top_k",
    "save_fisher",
    "select_backend",
    "upcycle",
]
