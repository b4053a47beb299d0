"""ResMoE-style compression of a trained MoE layer's experts (Ai et al., 2025): one shared
barycenter expert plus a low-rank residual per expert.

``W_e ~= W_bar + U_e V_e`` for each expert weight matrix, with ``W_bar`` the experts'
mean (their barycenter when their hidden units are aligned, as they are for experts
upcycled from one FFN) and ``U_e V_e`` the rank-``r`` truncated SVD of ``W_e - W_bar``;
biases are kept as they are. :func:`compress_experts` returns the compressed form and
the error it introduces (relative weight error, and relative output error on tokens you
give); :meth:`CompressedExperts.apply_to` writes the reconstruction back into the layer
so the compressed policy can be evaluated as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adamoe.moe import MoEFeedForward


@dataclass
class CompressedExperts:
    rank: int
    barycenter: dict[str, torch.Tensor]  # "w_in" (D, H'), "w_out" (H, D)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (U (E, rows, r), V (E, r, cols))
    biases: dict[str, torch.Tensor | None]
    report: dict[str, float] = field(default_factory=dict)

    def weight(self, name: str) -> torch.Tensor:
        """The reconstructed ``(E, rows, cols)`` weight."""
        u, v = self.factors[name]
        return self.barycenter[name].unsqueeze(0) + u @ v

    def num_parameters(self) -> int:
        count = sum(t.numel() for t in self.barycenter.values())
        count += sum(u.numel() + v.numel() for u, v in self.factors.values())
        return count + sum(b.numel() for b in self.biases.values() if b is not None)

    @torch.no_grad()
    def apply_to(self, layer: MoEFeedForward) -> None:
        for name in ("w_in", "w_out"):
            getattr(layer.experts, name).copy_(self.weight(name))


@torch.no_grad()
def compress_experts(layer: MoEFeedForward, rank: int, tokens: torch.Tensor | None = None) -> CompressedExperts:
    """Compress ``layer``'s routed experts to a barycenter plus rank-``rank`` residuals.

    ``report``: ``weight_rel_error`` (Frobenius, over every expert weight), ``params``
    (compressed) and ``dense_params`` (the experts as stored now), their ratio, and with
    ``tokens (N, D)`` the ``output_rel_error`` of every expert on them.
    """
    experts = layer.experts
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    barycenter, factors = {}, {}
    num, den = 0.0, 0.0
    for name in ("w_in", "w_out"):
        w = getattr(experts, name).detach().float()  # (E, rows, cols)
        bar = w.mean(0)
        residual = w - bar
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = min(rank, s.shape[-1])
        factors[name] = ((u[..., :r] * s[..., None, :r]).contiguous(), vh[..., :r, :].contiguous())
        barycenter[name] = bar
        approx = bar + factors[name][0] @ factors[name][1]
        num += float((approx - w).pow(2).sum())
        den += float(w.pow(2).sum())
    biases = {
        n: (None if getattr(experts, n) is None else getattr(experts, n).detach().clone()) for n in ("b_in", "b_out")
    }
    out = CompressedExperts(rank, barycenter, factors, biases)
    dense = sum(p.numel() for p in experts.parameters())
    out.report = {
        "rank": rank,
        "weight_rel_error": (num / den) ** 0.5 if den > 0 else 0.0,
        "params": out.num_parameters(),
        "dense_params": dense,
        "compression": dense / out.num_parameters(),
    }
    if tokens is not None:
        x = tokens.reshape(-1, experts.dim).to(experts.w_in.dtype)
        ref = torch.stack([experts.forward_expert(x, e) for e in range(experts.num_experts)])
        saved = (experts.w_in.detach().clone(), experts.w_out.detach().clone())
        try:
            out.apply_to(layer)
            approx = torch.stack([experts.forward_expert(x, e) for e in range(experts.num_experts)])
        finally:
            experts.w_in.copy_(saved[0])
            experts.w_out.copy_(saved[1])
        out.report["output_rel_error"] = float((approx - ref).norm() / ref.norm().clamp_min(1e-12))
    return out
