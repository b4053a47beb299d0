"""The Decision Transformer (Chen et al., 2021), single- and multi-task.

A GPT-2 body reads the interleaved tokens ``(R_1, s_1, a_1, R_2, s_2, a_2, ...)`` of a
context window (returns-to-go, states, actions, each plus a timestep embedding), and a
tanh head reads the action of step ``t`` off the state token ``s_t``.

Parameter names and semantics are those of Hugging Face ``DecisionTransformerModel``:
``encoder.*`` (``wte``, ``wpe``, ``h.<i>.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_f``; input-major ``Conv1D`` weights; every token gets position 0),
``embed_timestep``, ``embed_ln``. The multi-task form of the merging paper (Lawson &
Qureshi, arXiv 2303.07551) gives every task its own ``embed_state``, ``embed_action``,
``embed_return``, ``predict_state``, ``predict_action``, ``predict_return`` (under
``tasks.<name>.``, with the task's state normalisation), so tasks of different state and
action sizes share one body. A one-task model also loads a ``DecisionTransformerModel``
state dict as it is (see :meth:`DecisionTransformer.load_hf_state_dict`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import adamoe
from adamoe import MoEConfig
from policies.dt.configuration_dt import DecisionTransformerConfig
from policies.pretrained import PretrainedPolicy, register_policy

TASK_MODULES = ("embed_state", "embed_action", "embed_return", "predict_state", "predict_action", "predict_return")
TASK_BUFFERS = ("state_mean", "state_std")
BODY_FFN_PATTERN = r"^encoder\.h\.\d+\.mlp$"
_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_ACT.update({"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")})
_MOE_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


class Conv1D(nn.Module):
    """GPT-2's linear layer with input-major weights ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).reshape(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class Attention(nn.Module):
    def __init__(self, config: DecisionTransformerConfig) -> None:
        super().__init__()
        self.n_head, self.dim = config.n_head, config.hidden_size
        self.c_attn = Conv1D(3 * self.dim, self.dim)
        self.c_proj = Conv1D(self.dim, self.dim)
        self.scale = (self.dim // self.n_head) ** -0.5
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.reshape(b, t, self.n_head, -1).transpose(1, 2) for y in self.c_attn(x).split(self.dim, dim=-1))
        # Plain softmax attention (GPT-2's eager form): at DT sizes it is as fast as the fused
        # kernel on CPU, and torch.func.vmap (per-sample Fisher) has a batching rule for it.
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale + mask, dim=-1)
        y = self.attn_dropout(weights) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, self.dim)))


class MLP(nn.Module):
    def __init__(self, config: DecisionTransformerConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.inner_dim, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.inner_dim)
        self.act = _ACT[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: DecisionTransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    """The causal transformer shared by every task (``encoder`` in Hugging Face's model)."""

    def __init__(self, config: DecisionTransformerConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)  # unused, kept for state-dict parity
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds (B, T, D)``, ``attention_mask (B, T)`` (1 = real token, 0 = padding)."""
        t = inputs_embeds.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool, device=inputs_embeds.device).tril()
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        # Additive mask: a row with nothing to attend (left padding) gets a uniform softmax, never NaN.
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        x = self.drop(inputs_embeds + self.wpe.weight[0])  # Hugging Face's DT passes position_ids = 0
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)


class TaskIO(nn.Module):
    """One task's embeddings, heads and state normalisation."""

    def __init__(self, state_dim: int, act_dim: int, hidden: int, action_tanh: bool) -> None:
        super().__init__()
        self.embed_return = nn.Linear(1, hidden)
        self.embed_state = nn.Linear(state_dim, hidden)
        self.embed_action = nn.Linear(act_dim, hidden)
        self.predict_state = nn.Linear(hidden, state_dim)
        self.predict_action = nn.Sequential(nn.Linear(hidden, act_dim), *([nn.Tanh()] if action_tanh else []))
        self.predict_return = nn.Linear(hidden, 1)
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))


@dataclass
class DTOutput:
    state_preds: torch.Tensor
    action_preds: torch.Tensor
    return_preds: torch.Tensor


@register_policy("decision_transformer")
class DecisionTransformer(PretrainedPolicy):
    """A (multi-task) Decision Transformer; ``forward`` follows ``DecisionTransformerModel``."""

    config_class = DecisionTransformerConfig

    def __init__(self, config: DecisionTransformerConfig) -> None:
        super().__init__()
        self._stats_checked: set[str] = set()  # tasks whose state statistics were checked (once each)
        config.validate()
        self.config = config
        h = config.hidden_size
        self.encoder = GPT2Body(config)
        self.embed_timestep = nn.Embedding(config.max_ep_len, h)
        self.embed_ln = nn.LayerNorm(h)
        self.tasks = nn.ModuleDict(
            {t.name: TaskIO(t.state_dim, t.act_dim, h, config.action_tanh) for t in config.tasks}
        )
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.moe is not None:  # rebuild a merged-into-MoE model (weights are loaded after)
            self._build_moe(MoEConfig.from_dict(config.moe["config"]), config.moe["layers"])
        self._register_load_state_dict_pre_hook(self._hf_names_hook)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- Mixture of Experts --------------------------------------------------------------

    def _build_moe(self, moe_config: MoEConfig, layers: list[int]) -> None:
        for i in layers:
            if not 0 <= i < self.config.n_layer:
                raise ValueError(f"MoE layer index {i} is out of range for n_layer={self.config.n_layer}")
            self.encoder.h[i].mlp = adamoe.MoEFeedForward(
                moe_config,
                self.config.hidden_size,
                self.config.inner_dim,
                "mlp",
                _MOE_ACT[self.config.activation_function],
            )

    def set_moe(self, moe_layers: Mapping[int, adamoe.MoEFeedForward], moe_config: MoEConfig) -> None:
        """Install MoE layers in place of the body's MLPs (``{block index: layer}``) and record
        them in the config, so ``save_pretrained`` / ``from_pretrained`` round-trip."""
        if self.config.moe is not None:
            raise ValueError("this Decision Transformer's MLPs are already MoE layers")
        for i, layer in moe_layers.items():
            if not 0 <= i < self.config.n_layer:
                raise ValueError(f"MoE layer index {i} is out of range for n_layer={self.config.n_layer}")
            self.encoder.h[i].mlp = layer
        self.config.moe = {"config": moe_config.to_dict(), "layers": sorted(moe_layers)}

    # -- Hugging Face state dicts --------------------------------------------------------

    def _hf_names_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Let ``load_state_dict`` take a Hugging Face ``DecisionTransformerModel`` state dict:
        with one task, its top-level ``embed_state.*`` ... move under ``tasks.<name>.``."""
        if len(self.config.tasks) != 1 or f"{prefix}embed_state.weight" not in state_dict:
            return
        task = f"{prefix}tasks.{self.config.tasks[0].name}."
        for key in list(state_dict):
            rest = key[len(prefix) :]
            if rest.split(".")[0] in TASK_MODULES:
                state_dict[task + rest] = state_dict.pop(key)
        io = self.tasks[self.config.tasks[0].name]
        for name in TASK_BUFFERS:  # a DecisionTransformerModel does not normalise states
            state_dict.setdefault(
                task + name, getattr(io, name).new_full(getattr(io, name).shape, float(name == "state_std"))
            )

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a ``DecisionTransformerModel`` state dict (one-task models only), exactly."""
        if len(self.config.tasks) != 1:
            raise ValueError(f"a Hugging Face state dict has one task's heads; this model has {self.config.task_names}")
        self.load_state_dict(dict(state_dict), strict=True)

    # -- forward -------------------------------------------------------------------------

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self.config.tasks) != 1:
                raise ValueError(f"this model has several tasks {self.config.task_names}; say which with task=")
            return self.config.tasks[0].name
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.config.task_names}")
        return task

    def embed(
        self,
        task: str,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The interleaved, layer-normed token embeddings ``(B, 3L, D)`` and their mask."""
        io = self.tasks[task]
        spec = self.config.task(task)
        b, length = states.shape[:2]
        if states.shape[-1] != spec.state_dim or actions.shape[-1] != spec.act_dim:
            raise ValueError(
                f"task {task!r} takes states (B, L, {spec.state_dim}) and actions (B, L, {spec.act_dim}), got "
                f"{tuple(states.shape)} and {tuple(actions.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, length, dtype=torch.long, device=states.device)
        time = self.embed_timestep(timesteps)
        tokens = torch.stack(
            (io.embed_return(returns_to_go) + time, io.embed_state(states) + time, io.embed_action(actions) + time),
            dim=2,
        ).reshape(b, 3 * length, -1)
        mask = attention_mask.unsqueeze(-1).expand(b, length, 3).reshape(b, 3 * length)
        return self.embed_ln(tokens), mask

    def heads(self, task: str, hidden: torch.Tensor) -> DTOutput:
        io = self.tasks[task]
        b, length = hidden.shape[0], hidden.shape[1] // 3
        x = hidden.reshape(b, length, 3, -1)
        return DTOutput(
            state_preds=io.predict_state(x[:, :, 2]),
            action_preds=io.predict_action(x[:, :, 1]),
            return_preds=io.predict_return(x[:, :, 2]),
        )

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task: str | None = None,
    ) -> DTOutput:
        """``states (B, L, S)``, ``actions (B, L, A)``, ``returns_to_go (B, L, 1)``,
        ``timesteps (B, L)``, ``attention_mask (B, L)``, as ``DecisionTransformerModel``
        (states as the model was trained on them: normalised; returns scaled)."""
        task = self._task(task)
        tokens, mask = self.embed(task, states, actions, returns_to_go, timesteps, attention_mask)
        return self.heads(task, self.encoder(tokens, mask))

    def forward_tasks(self, batches: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, DTOutput]:
        """Several tasks' windows (same length) through the shared body in one pass."""
        names = [self._task(t) for t in batches]
        embedded = [
            self.embed(
                t,
                b["states"],
                b["actions"],
                b["returns_to_go"],
                b["timesteps"],
                b.get("attention_mask"),
            )
            for t, b in zip(names, batches.values(), strict=True)
        ]
        sizes = [e[0].shape[0] for e in embedded]
        hidden = self.encoder(torch.cat([e[0] for e in embedded]), torch.cat([e[1] for e in embedded]))
        return {t: self.heads(t, h) for t, h in zip(names, hidden.split(sizes), strict=True)}

    # -- acting --------------------------------------------------------------------------

    def normalize_states(self, task: str, states: torch.Tensor) -> torch.Tensor:
        io = self.tasks[task]
        return (states - io.state_mean) / io.state_std

    def set_state_stats(self, task: str, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor) -> None:
        io = self.tasks[self._task(task)]
        with torch.no_grad():
            io.state_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=io.state_mean.dtype))
            io.state_std.copy_(torch.as_tensor(np.asarray(std), dtype=io.state_std.dtype).clamp_min(1e-6))

    @torch.no_grad()
    def get_action(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        task: str | None = None,
    ) -> torch.Tensor:
        """The next action ``(B, A)`` from a history: raw ``states (B, T, S)``, ``actions (B, T, A)``
        (the current step's action slot is ignored), unscaled ``returns_to_go (B, T)`` or
        ``(B, T, 1)``, ``timesteps (B, T)``. The last ``context_length`` steps are used,
        left-padded as in the DT paper's evaluation."""
        task = self._task(task)
        spec = self.config.task(task)
        k = self.config.context_length
        io = self.tasks[task]
        if task not in self._stats_checked:
            self._stats_checked.add(task)
            if bool((io.state_mean == 0).all() and (io.state_std == 1).all()):
                warnings.warn(
                    f"task {task!r}: state statistics were never set (mean 0, std 1): the policy reads states on the "
                    "wrong scale. Call set_state_stats(task, mean, std) before training, or load a trained checkpoint.",
                    UserWarning,
                    stacklevel=3,
                )
        if returns_to_go.dim() == 2:
            returns_to_go = returns_to_go.unsqueeze(-1)
        states = self.normalize_states(task, states[:, -k:].float())
        actions, rtg = actions[:, -k:].float(), returns_to_go[:, -k:].float() / spec.return_scale
        steps = timesteps[:, -k:].long().clamp(0, self.config.max_ep_len - 1)
        b, length = states.shape[:2]
        pad = k - length
        mask = torch.cat([torch.zeros(b, pad), torch.ones(b, length)], dim=1).to(states.device, torch.long)

        def left(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.new_zeros(b, pad, *x.shape[2:]), x], dim=1)

        out = self(left(states), left(actions), left(rtg), left(steps), mask, task=task)
        return out.action_preds[:, -1]

    def action_loss(
        self, batches: Mapping[str, Mapping[str, torch.Tensor]], step: int = 0
    ) -> tuple[torch.Tensor, dict]:
        """Mean over tasks of the masked action MSE (the DT objective for continuous actions),
        plus the MoE auxiliary losses when the body has MoE layers."""
        outputs = self.forward_tasks(batches)
        logs: dict[str, float] = {}
        losses = []
        for task, out in outputs.items():
            b = batches[task]
            mask = b["attention_mask"].unsqueeze(-1).to(out.action_preds.dtype)
            err = ((out.action_preds - b["actions"]) ** 2 * mask).sum() / (mask.sum() * out.action_preds.shape[-1])
            losses.append(err)
            logs[f"loss/{task}"] = float(err.detach())
        loss = torch.stack(losses).mean()
        logs["action_loss"] = float(loss.detach())
        aux, aux_logs = adamoe.moe_aux_loss(self, step)
        if aux is not None:
            loss = loss + aux
            logs.update(aux_logs)
        return loss, logs
