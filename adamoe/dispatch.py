"""Token dispatch: run each token through its selected experts only, and combine.

Backends are interchangeable and numerically equal (tests compare them against a
per-token reference); ``select_backend`` picks one by shape, dtype and device.
- ``grouped_mm``: sort token-expert pairs by expert, then one
  ``torch.nn.functional.grouped_mm`` per projection over the jagged groups;
- ``loop``: the same sort, then one plain matmul per expert that received tokens;
- ``dense``: every expert on every token, combined with a dense (N, E) weight matrix;
  E times the FLOPs but static shapes (tiny E, CUDA graphs, export).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from adamoe.experts import GroupedExperts

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, GroupedExperts], torch.Tensor]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    def wrap(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn

    return wrap


def _sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-expert pairs ordered by expert: (pair order, token of each pair, tokens per expert)."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // indices.shape[1]
    counts = torch.bincount(flat, minlength=num_experts)
    return order, tokens, counts


def _combine(x: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, pair_weights: torch.Tensor) -> torch.Tensor:
    out = out * pair_weights.unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, out)


@register_backend("grouped_mm")
def grouped_mm_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts
) -> torch.Tensor:
    order, tokens, counts = _sort_by_expert(indices, experts.num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    pair_expert = indices.reshape(-1)[order]
    h = F.grouped_mm(x[tokens], experts.w_in, offs=offsets)
    if experts.b_in is not None:
        h = h + experts.b_in[pair_expert]
    out = F.grouped_mm(experts.hidden_act(h), experts.w_out, offs=offsets)
    if experts.b_out is not None:
        out = out + experts.b_out[pair_expert]
    return _combine(x, tokens, out, weights.reshape(-1)[order])


@register_backend("loop")
def loop_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts
) -> torch.Tensor:
    order, tokens, counts = _sort_by_expert(indices, experts.num_experts)
    xs = x[tokens]
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(experts.forward_expert(xs[start : start + n], e))
            start += n
    out = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
    return _combine(x, tokens, out, weights.reshape(-1)[order])


@register_backend("dense")
def dense_dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts
) -> torch.Tensor:
    h = torch.einsum("nd,edh->enh", x, experts.w_in)
    if experts.b_in is not None:
        h = h + experts.b_in.unsqueeze(1)
    out = torch.einsum("enh,ehd->end", experts.hidden_act(h), experts.w_out)
    if experts.b_out is not None:
        out = out + experts.b_out.unsqueeze(1)
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=out.dtype, device=x.device)
    combine.scatter_add_(1, indices, weights.to(out.dtype))
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


def select_backend(name: str, x: torch.Tensor, experts: GroupedExperts, top_k: int) -> str:
    """Resolve ``auto`` to a backend for this input; a named backend is checked and returned."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown dispatch backend {name!r}; valid backends are {sorted(BACKENDS)} or 'auto'")
        if name == "grouped_mm" and not grouped_mm_supported(x, experts):
            raise ValueError(
                f"backend 'grouped_mm' does not support dtype {x.dtype} on {x.device.type} with dims "
                f"({experts.dim}, {experts.hidden}); use 'loop' or 'auto'"
            )
        return name
    if experts.num_experts <= top_k:
        return "dense"  # every expert runs on every token anyway
    if grouped_mm_supported(x, experts):
        return "grouped_mm"
    return "loop"


def dispatch(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts, backend: str = "auto"
) -> torch.Tensor:
    """``sum_j weights[:, j] * E_{indices[:, j]}(x)`` for tokens ``x (N, D)``."""
    return BACKENDS[select_backend(backend, x, experts, indices.shape[1])](x, indices, weights, experts)
