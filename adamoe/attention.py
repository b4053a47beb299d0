"""Mixture of attention: attention layers upcycled into soft attention experts (BAM).

BAM (Zhang et al., arXiv 2408.08274) turns each attention layer of one or several dense
models into ``E`` attention experts. Expert ``e`` has its own query and output
projections, and its own keys and values unless they are shared (BAM's KV-sharing
variant: one key and one value projection serve every expert, which keeps the cache of
a single dense layer). Routing is soft: every token runs every expert and mixes their
outputs with the router's softmax,

    y = sum_e p_e(x) * O_e(Attention(Q_e x, K_e, V_e)),    p = softmax(W_r x).

The fast path folds the experts into the heads: one scaled-dot-product attention over
``H * E`` query heads, ordered head-major (``h * E + e``) so that with shared keys and
values each key head serves its ``E`` query heads as in grouped-query attention, and one
output matmul over the router-weighted heads, since ``sum_e p_e O_e a_e`` is the fused
output projection applied to ``[p_1 a_1, ..., p_E a_E]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adamoe.config import JSONConfig


@dataclass
class MoAConfig(JSONConfig):
    """A mixture-of-attention layer: ``num_experts`` soft attention experts.

    ``share_kv``: one key and one value projection for every expert (initialised from the
    dense layer, or the specialists' average); only queries and outputs are per expert.
    ``expert_noise_std``: relative Gaussian noise on each copy when one dense layer is
    upcycled (``from_dense``; specialists already differ and get none). With equal copies
    the layer computes the dense attention exactly, whatever the router says, because
    the mixing weights sum to 1; but for the same reason the router's gradient is then
    exactly zero (``d y / d logit_e = p_e (y_e - y)`` and every ``y_e`` is ``y``), and
    the experts can only drift apart through the small per-token differences of their
    mixing weights. The default 1% starts them apart, so the router learns from step 1;
    0 gives the exact dense layer.
    """

    num_experts: int = 4
    share_kv: bool = False
    router_init_std: float = 0.006
    expert_noise_std: float = 0.01

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.share_kv, bool):
            raise ValueError(f"share_kv must be True or False, got {self.share_kv!r}")
        for name in ("router_init_std", "expert_noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# The four projections of one attention layer, as nn.Linear modules: query, key, value, output.
Projections = tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]


class MixtureOfAttention(nn.Module):
    """``E`` soft attention experts of ``heads`` heads of ``head_dim`` each.

    Weights are fused across experts, with output features ordered ``(head, expert,
    head_dim)``: ``q_proj (H E d, D)``, ``k_proj`` and ``v_proj`` ``(H E d, D)`` or, when
    shared, ``(H d, D)``, ``o_proj (D, H E d)``, and ``o_bias (E, D)`` when the dense
    output projection had a bias (mixed by the router like the rest of the output).
    """

    def __init__(
        self, config: MoAConfig, dim: int, heads: int, head_dim: int, bias: bool = False, out_bias: bool = False
    ) -> None:
        super().__init__()
        config.validate()
        self.config, self.dim, self.heads, self.head_dim = config, dim, heads, head_dim
        e = config.num_experts
        self.kv_experts = 1 if config.share_kv else e
        self.q_proj = nn.Linear(dim, heads * e * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, heads * self.kv_experts * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, heads * self.kv_experts * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * e * head_dim, dim, bias=False)
        self.o_bias = nn.Parameter(torch.zeros(e, dim)) if out_bias else None
        self.router = nn.Linear(dim, e, bias=False)  # W_r
        nn.init.normal_(self.router.weight, std=config.router_init_std)
        self.last_probs: torch.Tensor | None = None  # (B, T, E) of the last forward, detached

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        projections: Projections,
        heads: int,
        config: MoAConfig,
        generator: torch.Generator | None = None,
    ) -> MixtureOfAttention:
        """Upcycle one attention layer: every expert a copy of it, plus relative noise of
        ``config.expert_noise_std`` (drawn from ``generator``)."""
        return cls._build([projections] * config.num_experts, heads, config, config.expert_noise_std, generator)

    @classmethod
    def from_specialists(
        cls,
        attentions: Sequence[Projections],
        heads: int,
        config: MoAConfig,
        generator: torch.Generator | None = None,
    ) -> MixtureOfAttention:
        """Expert ``e`` from the ``e``-th model's attention projections (BAM's mixture of
        attention from specialists), as they are (no noise); shared keys and values are
        the specialists' average. The router starts at N(0, router_init_std^2)."""
        return cls._build(attentions, heads, config, 0.0, generator)

    @classmethod
    def _build(
        cls,
        attentions: Sequence[Projections],
        heads: int,
        config: MoAConfig,
        noise_std: float,
        generator: torch.Generator | None,
    ) -> MixtureOfAttention:
        if len(attentions) != config.num_experts:
            raise ValueError(
                f"got {len(attentions)} attention layers for num_experts={config.num_experts}; give one per expert"
            )
        first = _check_projections(attentions[0], heads, 0)
        for i, attention in enumerate(attentions[1:], start=1):
            shapes = _check_projections(attention, heads, i)
            if shapes != first:
                raise ValueError(
                    f"attention {i} has projections {shapes}, attention 0 has {first}: experts must share one shape"
                )
        q0, _, _, o0 = attentions[0]
        dim, inner = q0.in_features, q0.out_features
        head_dim = inner // heads
        layer = cls(config, dim, heads, head_dim, bias=q0.bias is not None, out_bias=o0.bias is not None)
        h, d, e = heads, head_dim, config.num_experts

        def stacked(index: int, what: str) -> torch.Tensor:
            """``(H, E, d, ...)``: projection ``index`` of every expert, head-major."""
            tensors = [getattr(a[index], what).detach() for a in attentions]
            return torch.stack([t.reshape(h, d, *t.shape[1:]) for t in tensors], dim=1)

        with torch.no_grad():
            for index, proj in ((0, layer.q_proj), (1, layer.k_proj), (2, layer.v_proj)):
                for what in ("weight", "bias"):
                    target = getattr(proj, what)
                    if target is None:
                        continue
                    value = stacked(index, what)
                    if index > 0 and config.share_kv:
                        value = value.mean(1, keepdim=True)
                    noisy = _noisy(value, noise_std, generator, index == 0 or not config.share_kv)
                    target.copy_(noisy.reshape(target.shape))
            o = torch.stack([a[3].weight.detach().reshape(dim, h, d) for a in attentions], dim=2)  # (D, H, E, d)
            layer.o_proj.weight.copy_(_noisy(o, noise_std, generator, True).reshape(dim, h * e * d))
            if layer.o_bias is not None:
                layer.o_bias.copy_(torch.stack([a[3].bias.detach() for a in attentions]))
            noise = torch.randn(layer.router.weight.shape, generator=generator)
            layer.router.weight.copy_(noise * config.router_init_std)
        return layer.to(device=q0.weight.device, dtype=q0.weight.dtype)

    def expert_projections(self, expert: int) -> Projections:
        """Expert ``expert`` as a plain attention layer's four ``nn.Linear`` projections
        (copies): what it computes on its own, for references and inspection."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is not in [0, {self.num_experts})")
        h, d, e, dim = self.heads, self.head_dim, self.num_experts, self.dim
        out = []
        for proj, experts in ((self.q_proj, e), (self.k_proj, self.kv_experts), (self.v_proj, self.kv_experts)):
            j = expert if experts > 1 else 0
            linear = nn.Linear(dim, h * d, bias=proj.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(proj.weight.reshape(h, experts, d, dim)[:, j].reshape(h * d, dim))
                if proj.bias is not None:
                    linear.bias.copy_(proj.bias.reshape(h, experts, d)[:, j].reshape(h * d))
            out.append(linear)
        o = nn.Linear(h * d, dim, bias=self.o_bias is not None)
        with torch.no_grad():
            o.weight.copy_(self.o_proj.weight.reshape(dim, h, e, d)[:, :, expert].reshape(dim, h * d))
            if self.o_bias is not None:
                o.bias.copy_(self.o_bias[expert])
        return out[0], out[1], out[2], o

    # -- the computation, in three steps a caller may interleave with its own keys ----

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, D)`` -> queries ``(B, H E, T, d)`` and keys, values ``(B, H E', T, d)``
        (``E' = 1`` with shared keys and values), heads ordered ``h * E + e``."""
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def expand_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys or values ``(B, H, S, d)`` that every expert reads (a dense stream's cache,
        as the VLA's prefix) in this layer's key-head layout."""
        return kv if self.kv_experts == 1 else kv.repeat_interleave(self.kv_experts, dim=1)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled-dot-product attention of every expert's heads: ``(B, H E, T, d)``."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_experts == 1)

    def mix(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The router-weighted sum of the experts' output projections: ``(B, T, D)``."""
        b, _, t, _ = attended.shape
        probs = torch.softmax(self.router(x).float(), dim=-1).to(attended.dtype)  # (B, T, E)
        self.last_probs = probs.detach()
        heads = attended.transpose(1, 2).reshape(b, t, self.heads, self.num_experts, self.head_dim)
        out = self.o_proj((heads * probs[:, :, None, :, None]).reshape(b, t, -1))
        return out if self.o_bias is None else out + probs @ self.o_bias

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Self-attention over ``x (B, T, D)``; ``kv``: keys and values ``(B, H, S, d)``
        placed before the layer's own (shared by every expert); ``mask``: boolean or
        additive, broadcastable to ``(B, H E, T, S + T)``."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MixtureOfAttention expects (B, T, {self.dim}) inputs, got shape {tuple(x.shape)}")
        q, k, v = self.project(x)
        if kv is not None:
            k = torch.cat([self.expand_kv(kv[0]), k], dim=2)
            v = torch.cat([self.expand_kv(kv[1]), v], dim=2)
        return self.mix(self.attend(q, k, v, mask), x)

    def extra_repr(self) -> str:
        c = self.config
        return f"num_experts={c.num_experts}, heads={self.heads}, head_dim={self.head_dim}, share_kv={c.share_kv}"


def _check_projections(projections: Projections, heads: int, index: int) -> tuple:
    if len(projections) != 4 or not all(isinstance(p, nn.Linear) for p in projections):
        kinds = [type(p).__name__ for p in projections]
        raise ValueError(f"attention {index}: expected four nn.Linear projections (q, k, v, o), got {kinds}")
    q, k, v, o = projections
    if q.out_features % heads:
        raise ValueError(f"attention {index}: {q.out_features} query features do not split into {heads} heads")
    if not (q.weight.shape == k.weight.shape == v.weight.shape) or o.weight.shape != q.weight.T.shape:
        raise ValueError(
            f"attention {index}: q, k, v must map D -> H d and o H d -> D with one D (grouped-query "
            f"layers are not supported), got q {tuple(q.weight.shape)}, k {tuple(k.weight.shape)}, "
            f"v {tuple(v.weight.shape)}, o {tuple(o.weight.shape)}"
        )
    if len({p.bias is None for p in (q, k, v)}) > 1:
        present = {name: p.bias is not None for name, p in zip("qkv", (q, k, v), strict=True)}
        raise ValueError(f"attention {index}: q, k and v must all have a bias or none, got bias {present}")
    return tuple(tuple(p.weight.shape) for p in projections) + tuple(p.bias is not None for p in (q, o))


def _noisy(value: torch.Tensor, std: float, generator: torch.Generator | None, apply: bool) -> torch.Tensor:
    """``value`` with relative Gaussian noise (``std`` times its scale); upcycled copies
    with noise start apart. Noise is drawn on the CPU so a generator gives the same draw
    on every device."""
    if not apply or std == 0:
        return value
    noise = torch.randn(value.shape, generator=generator).to(value)
    return value + std * value.std() * noise
