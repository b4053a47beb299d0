"""Token dispatch: run each token through its selected experts only, and combine.

Backends are interchangeable and numerically equal (tests compare them against a
per-token reference); ``select_backend`` picks one by shape, load, dtype and device.
- ``grouped_mm``: token-expert pairs sorted by expert, then one
  ``torch.nn.functional.grouped_mm`` per projection over the jagged groups;
- ``batched_mm``: the same sort, each expert's tokens padded to the largest group, then
  one ``torch.bmm`` per projection (the capacity buffer of GShard/Switch, with the
  capacity set by the batch so no token is dropped);
- ``loop``: the same sort, then one plain matmul per expert that received tokens;
- ``dense``: every expert on every token, combined with a dense (N, E) weight matrix;
  E times the FLOPs but static shapes (tiny E, CUDA graphs, export).

Why ``auto`` prefers ``batched_mm`` for small groups on CPU: with a few dozen tokens
per expert the matmuls are bound by reading and packing each expert's weights, not by
arithmetic, so padding rows is nearly free and one batched call beats E small ones
(``make bench``; at 1 x 51 tokens, d=512, E=4 it is the fastest backend). With large
groups padding costs arithmetic, and ``grouped_mm`` runs exactly the routed rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from adamoe.experts import GroupedExperts

# auto on CPU: pad to the largest group when groups are this small, or when padding
# adds at most this fraction of rows (measured crossover, see module docstring).
SMALL_GROUP_ROWS = 64
MAX_PADDING = 0.25


@dataclass
class Routing:
    """The routing of N tokens to k experts each, and its expert-sorted form (lazily)."""

    indices: torch.Tensor  # (N, k) selected experts
    weights: torch.Tensor  # (N, k) their combine weights
    num_experts: int
    keep: torch.Tensor | None = None  # (N, k) bool: pairs over an expert's capacity are False (dropped)

    @cached_property
    def order(self) -> torch.Tensor:
        """The kept token-expert pairs (indices into the flattened (N, k)) sorted by expert, stable."""
        flat = self.indices.reshape(-1)
        if self.keep is None:
            return torch.argsort(flat, stable=True)
        kept = self.keep.reshape(-1).nonzero().squeeze(-1)
        return kept[torch.argsort(flat[kept], stable=True)]

    @cached_property
    def tokens(self) -> torch.Tensor:
        return self.order // self.indices.shape[1]

    @cached_property
    def pair_expert(self) -> torch.Tensor:
        return self.indices.reshape(-1)[self.order]

    @cached_property
    def pair_weights(self) -> torch.Tensor:
        return self.weights.reshape(-1)[self.order]

    @cached_property
    def counts(self) -> torch.Tensor:
        """Tokens per expert, (E,)."""
        return torch.bincount(self.pair_expert, minlength=self.num_experts)

    @cached_property
    def capacity(self) -> int:
        """The largest group: the rows per expert of a padded buffer (a host sync)."""
        return int(self.counts.max()) if self.order.numel() else 0

    @cached_property
    def dense_weights(self) -> torch.Tensor:
        """``weights`` with dropped pairs zeroed."""
        return self.weights if self.keep is None else self.weights * self.keep.to(self.weights.dtype)


Backend = Callable[[torch.Tensor, Routing, GroupedExperts], torch.Tensor]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    def wrap(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn

    return wrap


def _combine(x: torch.Tensor, routing: Routing, out: torch.Tensor) -> torch.Tensor:
    """Scale each pair's output by its weight and sum the pairs of each token."""
    out = out * routing.pair_weights.unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, routing.tokens, out)


@register_backend("grouped_mm")
def grouped_mm_dispatch(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    offsets = torch.cumsum(routing.counts, 0, dtype=torch.int32)
    h = F.grouped_mm(x[routing.tokens], experts.w_in, offs=offsets)
    if experts.b_in is not None:
        h = h + experts.b_in[routing.pair_expert]
    out = F.grouped_mm(experts.hidden_act(h), experts.w_out, offs=offsets)
    if experts.b_out is not None:
        out = out + experts.b_out[routing.pair_expert]
    return _combine(x, routing, out)


@register_backend("batched_mm")
def batched_mm_dispatch(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    first_pair = torch.cumsum(routing.counts, 0) - routing.counts
    slot = torch.arange(routing.order.numel(), device=x.device) - first_pair[routing.pair_expert]
    buffer = x.new_zeros(experts.num_experts, routing.capacity, x.shape[-1])  # (E, C, D)
    buffer[routing.pair_expert, slot] = x[routing.tokens]
    h = torch.bmm(buffer, experts.w_in)
    if experts.b_in is not None:
        h = h + experts.b_in.unsqueeze(1)
    out = torch.bmm(experts.hidden_act(h), experts.w_out)
    if experts.b_out is not None:
        out = out + experts.b_out.unsqueeze(1)
    return _combine(x, routing, out[routing.pair_expert, slot])


@register_backend("loop")
def loop_dispatch(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    xs = x[routing.tokens]
    outs, start = [], 0
    for e, n in enumerate(routing.counts.tolist()):
        if n:
            outs.append(experts.forward_expert(xs[start : start + n], e))
            start += n
    out = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
    return _combine(x, routing, out)


@register_backend("dense")
def dense_dispatch(x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    h = torch.einsum("nd,edh->enh", x, experts.w_in)
    if experts.b_in is not None:
        h = h + experts.b_in.unsqueeze(1)
    out = torch.einsum("enh,ehd->end", experts.hidden_act(h), experts.w_out)
    if experts.b_out is not None:
        out = out + experts.b_out.unsqueeze(1)
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=out.dtype, device=x.device)  # (N, E)
    combine.scatter_add_(1, routing.indices, routing.dense_weights.to(out.dtype))
    return torch.einsum("ne,end->nd", combine, out)


def grouped_mm_supported(x: torch.Tensor, experts: GroupedExperts) -> bool:
    """grouped_mm needs fp32/bf16 on CPU (bf16 on CUDA) and 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    else:
        return False
    elems = 16 // x.element_size()
    widths = (experts.dim, experts.w_in.shape[-1], experts.hidden)
    return ok_dtype and experts.w_in.dtype == x.dtype and all(w % elems == 0 for w in widths)


def select_backend(name: str, x: torch.Tensor, experts: GroupedExperts, routing: Routing) -> str:
    """Resolve ``auto`` to a backend for this input; a named backend is checked and returned."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown dispatch backend {name!r}; valid backends are {sorted(BACKENDS)} or 'auto'")
        if name == "grouped_mm" and not grouped_mm_supported(x, experts):
            raise ValueError(
                f"backend 'grouped_mm' does not support dtype {x.dtype} on {x.device.type} with dims "
                f"({experts.dim}, {experts.hidden}); use 'batched_mm', 'loop' or 'auto'"
            )
        return name
    if experts.num_experts <= routing.indices.shape[1] and routing.keep is None:
        return "dense"  # every expert runs on every token anyway
    if x.device.type == "cpu":
        padded = experts.num_experts * routing.capacity
        if routing.capacity <= SMALL_GROUP_ROWS or padded <= (1 + MAX_PADDING) * routing.order.numel():
            return "batched_mm"
    if grouped_mm_supported(x, experts):
        return "grouped_mm"
    return "loop"


def dispatch(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    experts: GroupedExperts,
    backend: str = "auto",
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_j keep[:, j] * weights[:, j] * E_{indices[:, j]}(x)`` for tokens ``x (N, D)``;
    dropped pairs (``keep`` False) are not computed at all."""
    routing = Routing(indices, weights, experts.num_experts, keep)
    return BACKENDS[select_backend(backend, x, experts, routing)](x, routing, experts)


def capacity_keep(indices: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Switch / GShard token dropping: expert ``e`` takes at most
    ``ceil(capacity_factor * N * k / E)`` token-expert pairs, first choices before second
    choices and, within a choice, tokens in order; returns the (N, k) mask of kept pairs."""
    n, k = indices.shape
    capacity = math.ceil(capacity_factor * n * k / num_experts)
    by_choice = indices.T.reshape(-1)  # choice-major: every token's first choice, then second...
    one_hot = torch.nn.functional.one_hot(by_choice, num_experts)
    position = (torch.cumsum(one_hot, 0) - 1).gather(1, by_choice.unsqueeze(1)).squeeze(1)
    return (position < capacity).reshape(k, n).T
