"""The network of the pi0-style VLA (``VLAModel``): the prefix transformer over visual and
word tokens, the action expert that reads the prefix's keys and values at every layer
under pi0's block mask, and the flow-matching math as small pure functions. The policy
around it (inputs, normalisation, sampling, the action queue) is ``modeling_vla.VLAPolicy``.

The action expert's feed-forward blocks are plain gated MLPs named
``action_expert.layers.<i>.mlp``: ``VLAPolicy.upcycle`` turns them into AdaMoE layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import adamoe
from policies.tokenizer import PAD_ID
from policies.vla.configuration_vla import VLAConfig
from policies.vla.perception import SceneEncoder

# The action expert's FFNs, relative to ``VLAModel.action_expert`` (what upcycling replaces).
EXPERT_FFN_PATTERN = r"^layers\.\d+\.mlp$"


# -- the math, as small pure functions -------------------------------------------------


def block_ids(num_prefix: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """pi0's attention blocks by one cumulative sum: prefix 0, state 1, actions 2.

    A token may attend to every key whose block is not after its own.
    """
    starts = torch.zeros(num_prefix + 1 + chunk_size, dtype=torch.long, device=device)
    starts[num_prefix] = 1  # the state token opens block 1
    starts[num_prefix + 1] = 1  # the first action token opens block 2
    return torch.cumsum(starts, 0)


def attention_mask(query_blocks: torch.Tensor, key_blocks: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, Q, K)`` boolean mask: key block <= query block, and the key is not padding."""
    allowed = key_blocks[None, :] <= query_blocks[:, None]  # (Q, K)
    return allowed[None, None] & key_valid[:, None, None, :]


def sample_time(batch: int, beta: tuple[float, float], time_min: float) -> torch.Tensor:
    """pi0's flow time: ``Beta(1.5, 1)`` (more weight near t = 1, the noisy end) in (time_min, 1)."""
    draw = torch.distributions.Beta(torch.tensor(float(beta[0])), torch.tensor(float(beta[1]))).sample((batch,))
    return draw * (1.0 - time_min) + time_min


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sinusoidal embedding of flow time ``t (B,)`` -> ``(B, dim)``, periods geometric in [min, max]."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(torch.float32)


def flow_matching_loss(
    output: torch.Tensor,
    noise: torch.Tensor,
    actions: torch.Tensor,
    is_pad: torch.Tensor,
    t: torch.Tensor,
    prediction: str = "velocity",
) -> torch.Tensor:
    """The flow-matching loss, padded steps excluded.

    ``prediction="velocity"`` (pi0): the network's output is the velocity, and the loss is
    its MSE to ``noise - actions``. ``prediction="actions"``: the output is the clean chunk
    ``a_hat`` and the velocity ``(x_t - a_hat) / t``; the loss is the MSE of ``a_hat``,
    which is the velocity MSE weighted by ``t ** 2`` (x-prediction, Li & He 2025).
    """
    if prediction == "velocity":
        error = (output - (noise - actions)).pow(2).mean(-1)  # (B, H)
    elif prediction == "actions":
        error = (output - actions).pow(2).mean(-1)
    else:
        raise ValueError(f"prediction={prediction!r} is not one of ('velocity', 'actions')")
    valid = (~is_pad).float()
    return (error * valid).sum() / valid.sum().clamp_min(1.0)


def velocity(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The flow velocity ``d x_t / d t`` from the network's output (see :func:`flow_matching_loss`)."""
    if prediction == "velocity":
        return output
    return (x_t - output) / t.reshape(-1, *[1] * (x_t.ndim - 1))


# -- modules ------------------------------------------------------------------------


class ConvStem(nn.Module):
    """An image ``(N, 3, S, S)`` in [0, 1] -> tokens ``(N, T, width)``.

    Stride-2 conv stages over the image and two coordinate channels (CoordConv: where a
    pixel is becomes a feature), then two kinds of tokens: a patch grid of
    ``(S / patch) ** 2`` tokens (what is where, coarsely), and ``keypoints`` spatial-softmax
    tokens, each the expected image position of one learned feature (Levine et al., 2016),
    which locate small objects to a fraction of a feature cell.
    """

    def __init__(self, channels: tuple[int, ...], patch: int, width: int, keypoints: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 5  # RGB + (x, y)
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.GELU()]
            c_in = c
        self.stages = nn.Sequential(*layers)
        rest = patch // 2 ** len(channels)
        self.patchify = nn.Conv2d(c_in, width, rest, stride=rest)
        self.keypoints = keypoints
        if keypoints:
            self.keypoint_logits = nn.Conv2d(c_in, keypoints, 1)
            self.keypoint_temperature = nn.Parameter(torch.zeros(()))  # log scale
            self.keypoint_proj = nn.Linear(2, width)
            self.keypoint_embed = nn.Parameter(torch.randn(keypoints, width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        x = self.stages(torch.cat([images * 2.0 - 1.0, _coordinates(n, h, w, images)], dim=1))
        tokens = rearrange(self.patchify(x), "n c h w -> n (h w) c")
        if not self.keypoints:
            return tokens
        logits = rearrange(self.keypoint_logits(x), "n k h w -> n k (h w)") * self.keypoint_temperature.exp()
        grid = rearrange(_coordinates(1, x.shape[2], x.shape[3], x)[0], "c h w -> (h w) c")  # (h*w, 2)
        expected = torch.softmax(logits, dim=-1) @ grid  # (N, K, 2) in [-1, 1]
        return torch.cat([tokens, self.keypoint_proj(expected) + self.keypoint_embed], dim=1)


def _coordinates(n: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, 2, h, w)``: each pixel's x and y in [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # (2, h, w)
    return grid.expand(n, 2, h, w)


class TextEncoder(nn.Module):
    """Hashed word tokens -> embeddings: each word's vector plus the mean of its n-grams'."""

    def __init__(self, width: int, buckets: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(buckets + 1, width, padding_idx=PAD_ID)

    def forward(self, ids: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
        gram_count = (grams != PAD_ID).sum(-1, keepdim=True).clamp_min(1)
        return self.embed(ids) + self.embed(grams).sum(-2) / gram_count  # (B, words, D)


FRACTION_FREQUENCIES = 4


def fraction_features(valid: torch.Tensor) -> torch.Tensor:
    """Each word's place in its instruction as a fraction (first 0, last 1), in Fourier
    features ``(B, words, 2 * FRACTION_FREQUENCIES)``: sin and cos of ``pi * k * fraction``,
    k = 1..F. Padding (``valid`` False) gets the features of the last word; it is never read."""
    index = (valid.cumsum(1) - 1).clamp_min(0).float()
    last = index.max(1, keepdim=True).values.clamp_min(1.0)
    fraction = index / last
    angles = fraction[..., None] * torch.pi * torch.arange(1, FRACTION_FREQUENCIES + 1, device=valid.device)
    return torch.cat([angles.sin(), angles.cos()], -1)


class GatedMLP(nn.Module):
    """GeGLU feed-forward (as Gemma, pi0's backbone): ``down(gelu(gate(x)) * up(x))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.act_fn = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TextPool(nn.Module):
    """``tokens`` learned queries read the instruction's words (one cross-attention, then a
    gated MLP): the prefix carries that many language tokens whatever the instruction's length."""

    def __init__(self, width: int, tokens: int, heads: int) -> None:
        super().__init__()
        self.query_embed = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.input_norm = nn.RMSNorm(width, eps=1e-6)
        self.attention = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.post_norm = nn.RMSNorm(width, eps=1e-6)
        self.mlp = GatedMLP(width, 2 * width)

    def forward(self, words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        queries = self.query_embed.expand(words.shape[0], -1, -1)
        keys = self.input_norm(words)
        read, _ = self.attention(queries, keys, keys, key_padding_mask=~valid, need_weights=False)
        x = queries + read
        return x + self.mlp(self.post_norm(x))


class Layer(nn.Module):
    """One stream's weights at one depth: pre-norm attention projections and a pre-norm MLP.

    ``kv_only``: the prefix's last layer, whose keys and values the action expert reads
    but whose own outputs nobody does. ``upcycle_attention`` replaces the four attention
    projections with soft attention experts (BAM); ``qkv``, ``attend`` and ``finish``
    then run those.
    """

    def __init__(
        self, width: int, heads: int, head_dim: int, mlp_ratio: float, dropout: float, kv_only: bool = False
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.kv_only = heads, kv_only
        self.input_norm = nn.RMSNorm(width, eps=1e-6)
        self.k_proj = nn.Linear(width, inner, bias=False)
        self.v_proj = nn.Linear(width, inner, bias=False)
        if not kv_only:
            self.q_proj = nn.Linear(width, inner, bias=False)
            self.o_proj = nn.Linear(inner, width, bias=False)
            self.post_norm = nn.RMSNorm(width, eps=1e-6)
            self.mlp = GatedMLP(width, int(round(mlp_ratio * width)))
            self.dropout = nn.Dropout(dropout)
        self.attention_experts: adamoe.MixtureOfAttention | None = None

    def upcycle_attention(self, experts: adamoe.MixtureOfAttention) -> None:
        """Replace q, k, v and o by ``experts`` (built from them or from specialists')."""
        if self.kv_only:
            raise ValueError("the prefix's last layer has no queries or outputs to upcycle")
        if self.attention_experts is not None:
            raise ValueError("this layer's attention is already upcycled")
        width, inner = self.q_proj.in_features, self.q_proj.out_features
        got = (experts.dim, experts.heads, experts.head_dim)
        if got != (width, self.heads, inner // self.heads):
            raise ValueError(
                f"attention experts of (dim, heads, head_dim) = {got} do not fit this layer's "
                f"{(width, self.heads, inner // self.heads)}"
            )
        biased = {"qkv": experts.q_proj.bias is not None, "o": experts.o_bias is not None}
        if any(biased.values()):  # the policy's own projections have none, and its config records none
            raise ValueError(f"this layer's attention has no biases; the attention experts have bias {biased}")
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj
        self.attention_experts = experts

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        h = self.input_norm(x)
        if self.attention_experts is not None:
            return self.attention_experts.project(h)
        split = lambda y: rearrange(y, "b t (h d) -> b h t d", h=self.heads)
        q = None if self.kv_only else split(self.q_proj(h))
        return q, split(self.k_proj(h)), split(self.v_proj(h))

    def external_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Another stream's keys or values ``(B, heads, S, d)`` in this layer's key-head layout."""
        return kv if self.attention_experts is None else self.attention_experts.expand_kv(kv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.attention_experts is not None:
            return self.attention_experts.attend(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        if self.attention_experts is not None:  # the router reads the attention's input
            out = self.attention_experts.mix(attended, self.input_norm(x))
        else:
            out = self.o_proj(rearrange(attended, "b h t d -> b t (h d)"))
        x = x + self.dropout(out)
        return x + self.dropout(self.mlp(self.post_norm(x)))


class ActionExpert(nn.Module):
    """The suffix stream: embeds [state, noisy actions + flow time] and predicts velocities."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        d = config.expert_width
        self.state_proj = nn.Linear(config.state_dim, d)
        self.action_in_proj = nn.Linear(config.action_dim, d)
        self.action_time_mlp_in = nn.Linear(2 * d, d)
        self.action_time_mlp_out = nn.Linear(d, d)
        self.action_pos = nn.Parameter(torch.randn(config.chunk_size, d) * 0.02)
        self.layers = nn.ModuleList(
            Layer(d, config.num_heads, config.head_dim, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.final_norm = nn.RMSNorm(d, eps=1e-6)
        self.action_out_proj = nn.Linear(d, config.action_dim)
        self.config = config

    def embed(self, state: torch.Tensor, noisy_actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + H, D)``: the state token, then action tokens mixed with the time embedding."""
        c = self.config
        actions = self.action_in_proj(noisy_actions)  # (B, H, D)
        time = time_embedding(t, c.expert_width, c.min_period, c.max_period)[:, None].expand_as(actions)
        actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, time], -1))))
        return torch.cat([self.state_proj(state)[:, None], actions + self.action_pos], dim=1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.action_out_proj(self.final_norm(x[:, 1:]))


class VLAModel(nn.Module):
    """Prefix (vision + language) transformer and action expert sharing attention per layer."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.prefix_width
        if c.vision == "conv":
            self.vision = ConvStem(c.vision_channels, c.patch, d, c.keypoints)
            self.camera_embed = nn.Parameter(torch.randn(len(c.cameras), d) * 0.02)
            self.image_pos = nn.Parameter(torch.randn(c.tokens_per_image, d) * 0.02)
        else:
            self.scene_encoder = SceneEncoder(
                len(c.cameras),
                c.state_dim,
                len(c.scene_indices),
                c.scene_channels,
                c.scene_strides,
                c.scene_keypoints,
                c.scene_hidden,
            )
            # An object's token reads its position (standardised) and its offset from the
            # gripper (in decimetres): the geometry a reaching or grasping policy acts on.
            self.object_in = nn.Sequential(nn.Linear(6, d), nn.GELU(), nn.Linear(d, d))
            self.object_embed = nn.Parameter(torch.randn(len(c.scene_objects) + 1, d) * 0.02)
            self.scene_token = nn.Linear(c.scene_hidden, d)
        self.text = TextEncoder(d, c.text_buckets)
        self.text_pos = nn.Parameter(torch.randn(c.max_words, d) * 0.02) if c.word_positions == "learned" else None
        self.text_fraction = nn.Linear(2 * FRACTION_FREQUENCIES, d) if c.word_positions == "fraction" else None
        self.text_pool = TextPool(d, c.text_tokens, c.num_heads) if c.text_tokens else None
        self.prefix_layers = nn.ModuleList(
            Layer(d, c.num_heads, c.head_dim, c.mlp_ratio, c.dropout, kv_only=(i == c.depth - 1))
            for i in range(c.depth)
        )
        self.action_expert = ActionExpert(c)
        self.scene_readout = None
        if c.scene_aux_dim:  # training-only: object positions from the image tokens (see VLAConfig)
            image_tokens = len(c.cameras) * c.tokens_per_image
            self.scene_readout = nn.Sequential(
                nn.Linear(image_tokens * d, 256), nn.GELU(), nn.Linear(256, c.scene_aux_dim)
            )
        self.apply(_init_weights)
        if c.vision == "scene":  # a CNN + MLP trains on PyTorch's fan-in init, not GPT's 0.02
            self.scene_encoder.reset_parameters()

    # prefix

    def conv_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """vision="conv": images ``(B, cams, 3, S, S)`` -> ``(B, cams * T, D)`` image tokens."""
        b, cams = images.shape[:2]
        img = self.vision(images.flatten(0, 1)).unflatten(0, (b, cams))  # (B, cams, T, D)
        return (img + self.image_pos + self.camera_embed[:, None]).flatten(1, 2)

    def scene_tokens(self, positions: torch.Tensor, features: torch.Tensor, grip: torch.Tensor) -> torch.Tensor:
        """vision="scene": ``positions`` ``(B, n)`` standardised and ``metres`` ``(B, n)`` of the
        predicted objects (stacked as ``(2, B, n)`` in ``positions``), the encoder's
        ``features`` ``(B, hidden)`` and the gripper's position ``grip`` ``(B, 3)`` in metres ->
        ``(B, objects + 1, D)``: one token per object, then one of the features."""
        standard, metres = positions
        objects = []
        start = 0
        for group in self.config.scene_objects:
            end = start + len(group)
            pad = (0, 3 - len(group))
            offset = (F.pad(metres[:, start:end], pad) - grip) * 10.0
            objects.append(torch.cat([F.pad(standard[:, start:end], pad), offset], dim=1))
            start = end
        tokens = torch.cat([self.object_in(torch.stack(objects, dim=1)), self.scene_token(features)[:, None]], dim=1)
        return tokens + self.object_embed

    def embed_prefix(self, visual: torch.Tensor, text: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens ``(B, V, D)`` and encoded words -> prefix tokens ``(B, P, D)`` and validity."""
        word_ids, grams, txt_valid = text
        txt = self.text(word_ids, grams)
        if self.text_pos is not None:
            txt = txt + self.text_pos[: word_ids.shape[1]]
        elif self.text_fraction is not None:
            txt = txt + self.text_fraction(fraction_features(txt_valid).to(txt.dtype))
        if self.text_pool is not None:
            txt = self.text_pool(txt, txt_valid)
            txt_valid = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
        tokens = torch.cat([visual, txt], dim=1)
        valid = torch.cat([torch.ones(visual.shape[:2], dtype=torch.bool, device=txt.device), txt_valid], 1)
        return tokens, valid

    def prefix_cache(self, tokens: torch.Tensor, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix once; its keys and values at every layer, in the key-head layout of
        the action-expert layer that reads them (expanded here once per chunk, not per step)."""
        mask = valid[:, None, None, :]
        cache, x = [], tokens
        for layer, reader in zip(self.prefix_layers, self.action_expert.layers, strict=True):
            q, k, v = layer.qkv(x)
            cache.append((reader.external_kv(k), reader.external_kv(v)))
            if not layer.kv_only:
                x = layer.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return cache

    # suffix

    def expert_cached(
        self, cache: list[tuple[torch.Tensor, torch.Tensor]], prefix_valid: torch.Tensor, suffix: torch.Tensor
    ) -> torch.Tensor:
        """The action expert's output ``(B, H, A)`` for suffix tokens ``(B, 1 + H, D)`` over cached
        prefix keys/values: a velocity or a clean action chunk, by ``config.prediction``."""
        num_prefix, chunk = prefix_valid.shape[1], suffix.shape[1] - 1
        blocks = block_ids(num_prefix, chunk, suffix.device)
        key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(suffix.shape[0], chunk + 1)], dim=1)
        mask = attention_mask(blocks[num_prefix:], blocks, key_valid)
        x = suffix
        for layer, (k_prefix, v_prefix) in zip(self.action_expert.layers, cache, strict=True):
            q, k, v = layer.qkv(x)
            k, v = torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2)
            x = layer.finish(x, layer.attend(q, k, v, mask))
        return self.action_expert.head(x)

    def expert_joint(self, prefix: torch.Tensor, prefix_valid: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        """The same output with no cache: both streams run jointly over the whole sequence."""
        num_prefix, chunk = prefix.shape[1], suffix.shape[1] - 1
        blocks = block_ids(num_prefix, chunk, suffix.device)
        key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(suffix.shape[0], chunk + 1)], dim=1)
        mask = attention_mask(blocks, blocks, key_valid)  # (B, 1, P + 1 + H, P + 1 + H)
        x_p, x_e = prefix, suffix
        for p_layer, e_layer in zip(self.prefix_layers, self.action_expert.layers, strict=True):
            q_p, k_p, v_p = p_layer.qkv(x_p)
            q_e, k_e, v_e = e_layer.qkv(x_e)
            if e_layer.attention_experts is not None:  # the streams' heads differ: attend apart
                if not p_layer.kv_only:  # the prefix sees only the prefix
                    pp = mask[:, :, :num_prefix, :num_prefix]
                    x_p = p_layer.finish(x_p, F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=pp))
                k = torch.cat([e_layer.external_kv(k_p), k_e], dim=2)
                v = torch.cat([e_layer.external_kv(v_p), v_e], dim=2)
                x_e = e_layer.finish(x_e, e_layer.attend(q_e, k, v, mask[:, :, num_prefix:]))
                continue
            k, v = torch.cat([k_p, k_e], dim=2), torch.cat([v_p, v_e], dim=2)
            if p_layer.kv_only:  # nobody reads the prefix's last outputs
                out_e = F.scaled_dot_product_attention(q_e, k, v, attn_mask=mask[:, :, num_prefix:])
            else:
                out = F.scaled_dot_product_attention(torch.cat([q_p, q_e], 2), k, v, attn_mask=mask)
                out_p, out_e = out[:, :, :num_prefix], out[:, :, num_prefix:]
                x_p = p_layer.finish(x_p, out_p)
            x_e = e_layer.finish(x_e, out_e)
        return self.action_expert.head(x_e)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
