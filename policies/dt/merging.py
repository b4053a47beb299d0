"""Merging Decision Transformer specialists into one multi-task policy.

Specialists are fine-tuned from one common initialisation, so they share every name and
shape. The merge plan of the merging paper averages the shared body (transformer blocks,
timestep embedding, embedding layer norm) and keeps each task's embeddings and heads
from that task's specialist. Or, as an alternative to averaging, the body's MLPs become
AdaMoE layers whose routed experts are the specialists' MLPs (Branch-Train-Mix / BAM),
the rest of the body is averaged, and the routers are fitted on the tasks' data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

import adamoe
from adamoe import MergePlan, MoEConfig
from adamoe.fisher import fisher_diagonal
from policies.dt.data import OfflineData, window_sampler
from policies.dt.modeling_dt import DecisionTransformer

# The shared body; `encoder.wte` is never read by the model, so it is not merged.
BODY_PLAN = MergePlan(
    merge=[r"^encoder\.", r"^embed_timestep\.", r"^embed_ln\."], keep=[r"^tasks\.", r"^encoder\.wte\."]
)
PLANS = {"body": BODY_PLAN, "all-shared": MergePlan(keep=[r"^tasks\."])}
MERGE_METHODS = ("average", "fisher", "task_arithmetic", "ties", "moe")


def plan_from(name_or_patterns: str | MergePlan | None) -> MergePlan:
    """A named plan (``body``, ``all-shared``), a :class:`MergePlan`, or ``"merge=RE,RE;keep=RE"``."""
    if name_or_patterns is None:
        return BODY_PLAN
    if isinstance(name_or_patterns, MergePlan):
        return name_or_patterns
    if name_or_patterns in PLANS:
        return PLANS[name_or_patterns]
    if "=" not in name_or_patterns:
        raise ValueError(
            f"unknown merge plan {name_or_patterns!r}; named plans are {sorted(PLANS)} or 'merge=RE;keep=RE'"
        )
    parts = dict(p.split("=", 1) for p in name_or_patterns.split(";") if p)
    unknown = sorted(set(parts) - {"merge", "keep"})
    if unknown:
        raise ValueError(f"unknown merge plan field {unknown[0]!r}; valid fields are ['keep', 'merge']")
    merge = [p for p in parts.get("merge", ".*").split(",") if p]
    keep = [p for p in parts.get("keep", "").split(",") if p]
    return MergePlan(merge=merge, keep=keep + [r"^tasks\."])


def _owners(specialists: Mapping[str, DecisionTransformer]) -> list[str]:
    if not specialists:
        raise ValueError("nothing to merge: no specialists given")
    first = next(iter(specialists.values()))
    names = first.config.task_names
    for task, model in specialists.items():
        if task not in names:
            raise ValueError(f"specialist for {task!r}: the models' tasks are {names}")
        if model.config.task_names != names:
            raise ValueError(
                f"the specialist for {task!r} has tasks {model.config.task_names}, the first one {names}: "
                "specialists must come from one common initialisation"
            )
    return list(specialists)


def assemble(
    specialists: Mapping[str, DecisionTransformer],
    merged: Mapping[str, torch.Tensor],
    role: str,
    template: DecisionTransformer | None = None,
) -> DecisionTransformer:
    """One model: ``merged`` tensors, each task's ``tasks.<task>.*`` from its specialist, and
    everything else from ``template`` (default: the first specialist)."""
    tasks = _owners(specialists)
    model = copy.deepcopy(template if template is not None else next(iter(specialists.values())))
    state = model.state_dict()
    for name, value in merged.items():
        state[name] = value
    for task in tasks:
        prefix = f"tasks.{task}."
        for name, value in specialists[task].state_dict().items():
            if name.startswith(prefix):
                state[name] = value
    model.load_state_dict(state)
    model.config = copy.deepcopy(model.config)
    model.config.role = role
    return model.eval()


def merge_specialists(
    specialists: Mapping[str, DecisionTransformer],
    method: str = "fisher",
    *,
    fishers: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    base: DecisionTransformer | None = None,
    plan: MergePlan | str | None = None,
    **options: Any,
) -> DecisionTransformer:
    """One multi-task DT from ``{task: specialist}`` by ``adamoe.merge`` over the plan's names.

    ``fishers`` (``{task: Fisher}``) for ``method="fisher"``; ``base`` (the common
    initialisation) for ``task_arithmetic`` and ``ties``; ``options`` go to ``adamoe.merge``
    (``normalization``, ``floor``, ``scale``, ``density``, ``weights``).
    """
    if method not in MERGE_METHODS or method == "moe":
        raise ValueError(f"method={method!r} is not one of {MERGE_METHODS[:-1]} (use merge_into_moe for 'moe')")
    tasks = _owners(specialists)
    sds = [specialists[t].state_dict() for t in tasks]
    fisher_list = None
    if method == "fisher":
        if fishers is None or any(t not in fishers for t in tasks):
            missing = [t for t in tasks if fishers is None or t not in fishers]
            raise ValueError(f"method='fisher' needs a Fisher for every specialist; missing {missing}")
        fisher_list = [fishers[t] for t in tasks]
    merged = adamoe.merge(
        sds,
        method,
        fishers=fisher_list,
        base=base.state_dict() if base is not None else None,
        plan=plan_from(plan),
        **options,
    )
    return assemble(specialists, merged, f"merge:{method}", template=base)


def merge_into_moe(
    specialists: Mapping[str, DecisionTransformer],
    moe_config: MoEConfig | None = None,
    body_method: str = "average",
    fishers: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    layers: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> DecisionTransformer:
    """One DT whose body MLPs (``layers``, default all) are MoE layers with specialist ``i``'s
    MLP as routed expert ``i``; the rest of the body is merged by ``body_method``.

    The default layer is AdaMoE's router (which expert) with its scale adapter (how much),
    top-1 over one expert per specialist, no shared expert, routed coefficient 1: a token
    runs exactly one specialist's MLP, scaled by ``p_i + s_i``. Fit the routers next
    (``train_dt(..., DTTrainConfig(trainable="router"))``).
    """
    tasks = _owners(specialists)
    first = specialists[tasks[0]]
    n_layer = first.config.n_layer
    layers = list(range(n_layer)) if layers is None else sorted(layers)
    if moe_config is None:
        moe_config = MoEConfig(
            num_experts=len(tasks), top_k=1, num_shared_experts=0, router="adamoe", routed_coef=1.0, shared_coef=0.0
        )
    if moe_config.num_experts != len(tasks):
        raise ValueError(f"moe_config.num_experts={moe_config.num_experts} but there are {len(tasks)} specialists")
    mlp = [rf"^encoder\.h\.{i}\.mlp\." for i in layers]
    plan = MergePlan(merge=BODY_PLAN.merge, keep=BODY_PLAN.keep + mlp)
    merged_body = merge_specialists(specialists, body_method, fishers=fishers, plan=plan)
    model = copy.deepcopy(merged_body)
    moe = {
        i: adamoe.MoEFeedForward.from_experts(
            [specialists[t].encoder.h[i].mlp for t in tasks], copy.deepcopy(moe_config), generator=generator
        )
        for i in layers
    }
    model.set_moe(moe, moe_config)
    model.config.role = f"merge:moe({body_method})"
    return model.eval()


def dt_fisher(
    model: DecisionTransformer,
    task: str,
    data: OfflineData,
    samples: int = 512,
    batch_size: int = 64,
    kind: str = "exact",
    sigma: float = 1.0,
    method: str = "vmap",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``model`` on ``task``'s data: random context windows, the
    Gaussian action likelihood of the window's last step (the action the policy takes)."""
    sampler = window_sampler(model, task, data)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device

    def batches():
        while True:
            yield sampler.sample(batch_size, rng, device)

    def mean_fn(m: DecisionTransformer, b: dict) -> torch.Tensor:
        out = m(b["states"], b["actions"], b["returns_to_go"], b["timesteps"], b["attention_mask"], task=task)
        return out.action_preds[:, -1]

    return fisher_diagonal(
        model,
        batches(),
        mean_fn,
        target_fn=lambda b: b["actions"][:, -1],
        kind=kind,
        sigma=sigma,
        max_samples=samples,
        method=method,
        progress=progress,
    )
