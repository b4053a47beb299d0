"""A pi0-style vision-language-action policy, small enough to train on a CPU.

The layout of pi0 (Black et al., 2024), scaled down:
- a prefix of image tokens (a conv stem per camera) and language tokens (hashed words
  with their character n-grams), processed by a bidirectional transformer;
- an action expert, a second transformer with its own weights over [state token,
  H noisy action tokens], whose attention at every layer also reads that layer's prefix
  keys and values, under pi0's block mask: the prefix sees only the prefix, the state
  token sees the prefix and itself, action tokens see everything;
- flow matching: ``x_t = t * noise + (1 - t) * actions``, the expert predicts the
  velocity ``noise - actions``, and sampling integrates from noise at t = 1 to actions
  at t = 0 with Euler steps.
The prefix never attends to the suffix, so its keys and values are computed once per
chunk and reused by every denoising step (``use_cache=True``); ``use_cache=False``
recomputes the whole sequence jointly at each step, the reference the cache is tested
against.

The action expert's feed-forward blocks are plain gated MLPs named
``action_expert.layers.<i>.mlp``: ``VLAPolicy.upcycle`` turns them into AdaMoE layers.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import adamoe
from adamoe import MoAConfig, MoEConfig
from policies.constants import ACTION, OBS_ENV_STATE, OBS_IMAGES, OBS_STATE, SCENE_FEATURES, SCENE_POSITIONS, image_key
from policies.normalize import Normalizer
from policies.pretrained import PretrainedPolicy, register_policy
from policies.tokenizer import augment, encode, insert_unknown
from policies.vla.configuration_vla import VLAConfig
from policies.vla.model import EXPERT_FFN_PATTERN, VLAModel, flow_matching_loss, sample_time, velocity

# -- the policy ---------------------------------------------------------------------


@register_policy("vla")
class VLAPolicy(PretrainedPolicy):
    """The policy API (LeRobot's): ``predict_action_chunk``, ``select_action``, ``reset``.

    Batches use LeRobot's keys: ``observation.images.<camera>`` ``(B, 3, S, S)`` floats in
    [0, 1], ``observation.state`` ``(B, state_dim)``, ``task`` (B instruction strings),
    and for training ``action`` ``(B, H, action_dim)`` with ``action_is_pad`` ``(B, H)``.
    ``select_action`` also takes a Gymnasium observation (single or from a vector env).
    """

    config_class = VLAConfig

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = VLAModel(config)
        self._stats_checked = False  # the first chunk checks the statistics were set (once: not a hot-path cost)
        self.state_norm = Normalizer(config.state_dim, config.normalization)
        self.action_norm = Normalizer(config.action_dim, config.normalization)
        if config.scene_aux_dim:
            self.scene_norm = Normalizer(config.scene_aux_dim, config.normalization)
        if config.vision == "scene":
            # The scene encoder's targets are standardised whatever ``normalization`` says:
            # its smooth-L1 loss weighs every coordinate alike.
            self.scene_target_norm = Normalizer(len(config.scene_indices), "mean_std")
            self.scene_state_norm = Normalizer(config.state_dim, "mean_std")  # the encoder's own input scale
            self.model.scene_encoder.requires_grad_(not config.freeze_vision)
        if config.moe is not None:  # rebuild an upcycled policy (weights are loaded after)
            adamoe.upcycle(
                self.model.action_expert, MoEConfig.from_dict(config.moe["config"]), EXPERT_FFN_PATTERN, "paper"
            )
        if config.attention_moe is not None:
            moa = MoAConfig.from_dict(config.attention_moe["config"])
            shape = (config.expert_width, config.num_heads, config.head_dim)
            for layer in self.model.action_expert.layers:
                layer.upcycle_attention(adamoe.MixtureOfAttention(moa, *shape))
        self._queue: deque[np.ndarray] = deque()

    # -- set-up -------------------------------------------------------------------

    def set_normalization(self, stats: dict[str, dict[str, Any]], scene: bool = True) -> None:
        """Statistics from the training data: ``{OBS_STATE: {...}, ACTION: {...}}``
        (and ``observation.environment_state`` for the scene encoder's targets). ``scene=False``
        keeps the scene encoder's target statistics: a trained encoder's outputs are in them."""
        needed = [OBS_STATE, ACTION, *([OBS_ENV_STATE] if self.config.scene_aux_dim else [])]
        missing = [key for key in needed if key not in stats]
        if missing:
            raise ValueError(
                f"statistics are missing {missing}; they hold {sorted(stats)} (ChunkDataset.stats() has all)"
            )
        self.state_norm.fit(stats[OBS_STATE])
        self.action_norm.fit(stats[ACTION])
        if self.config.scene_aux_dim:
            self.scene_norm.fit(stats[OBS_ENV_STATE])
        if self.config.vision == "scene" and scene:
            if OBS_ENV_STATE not in stats:
                raise ValueError(
                    "vision='scene' needs 'observation.environment_state' statistics (the scene encoder's "
                    "training labels); the datasets hold no environment_state"
                )
            scene = stats[OBS_ENV_STATE]
            dim = len(np.asarray(scene["mean"]))
            if max(self.config.scene_indices) >= dim:
                raise ValueError(
                    f"scene_objects index {max(self.config.scene_indices)} is out of range for an "
                    f"environment_state of {dim} values"
                )
            idx = self.config.scene_indices
            self.scene_target_norm.fit({k: np.asarray(v)[idx] for k, v in scene.items()})
            self.scene_state_norm.fit(stats[OBS_STATE])

    def upcycle(
        self, moe_config: MoEConfig | None = None, init: str = "paper", generator: torch.Generator | None = None
    ) -> adamoe.UpcycleReport:
        """Turn the action expert's FFNs into MoE layers (AdaMoE by default), in place."""
        if self.config.moe is not None:
            raise ValueError("this policy is already upcycled")
        report = adamoe.upcycle(self.model.action_expert, moe_config, EXPERT_FFN_PATTERN, init, generator)
        self.config.moe = {
            "config": report.config.to_dict(),
            "init": init,
            "layers": [f"model.action_expert.{name}" for name in report.names],
        }
        return report

    def upcycle_attention(
        self, config: MoAConfig | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Turn the action expert's attention layers into soft attention experts (BAM), in
        place: every expert a copy of the layer plus ``config.expert_noise_std`` relative
        noise (with 0 the policy computes exactly what it did, but the routers get no
        gradient until the experts drift apart; see ``MoAConfig``). Returns what
        ``config.attention_moe`` now records."""
        if self.config.attention_moe is not None:
            raise ValueError("this policy's attention is already upcycled")
        config = MoAConfig() if config is None else config
        before = sum(p.numel() for p in self.parameters())
        for layer in self.model.action_expert.layers:
            moa = adamoe.MixtureOfAttention.from_dense(layer.projections(), self.config.num_heads, config, generator)
            layer.upcycle_attention(moa)
        names = [f"model.action_expert.layers.{i}.attention_experts" for i in range(self.config.depth)]
        self.config.attention_moe = {"config": config.to_dict(), "layers": names}
        after = sum(p.numel() for p in self.parameters())
        return {**self.config.attention_moe, "params_before": before, "params_after": after}

    # -- inputs -------------------------------------------------------------------

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        images = []
        for camera in c.cameras:
            key = image_key(camera)
            if key not in batch:
                present = sorted(k for k in batch if k.startswith(f"{OBS_IMAGES}."))
                raise ValueError(f"batch is missing camera {camera!r} ({key}); it has {present}")
            image = torch.as_tensor(batch[key])
            if image.ndim != 4 or tuple(image.shape[1:]) != (3, c.image_size, c.image_size):
                raise ValueError(
                    f"{key} must have shape (B, 3, {c.image_size}, {c.image_size}), got {tuple(image.shape)}"
                )
            if not torch.isfinite(image).all():
                raise ValueError(f"{key} contains NaN or infinite values")
            images.append(image.float())
        return torch.stack(images, dim=1).to(self._device)  # (B, cams, 3, S, S)

    def _state(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.state_norm.normalize(self._raw_state(batch))

    def _raw_state(self, batch: dict[str, Any]) -> torch.Tensor:
        if OBS_STATE not in batch:
            raise ValueError("batch is missing 'observation.state'")
        state = torch.as_tensor(batch[OBS_STATE]).float()
        if state.ndim != 2 or state.shape[1] != self.config.state_dim:
            raise ValueError(
                f"observation.state must have shape (B, {self.config.state_dim}), got {tuple(state.shape)}"
            )
        if not torch.isfinite(state).all():
            raise ValueError(f"observation.state contains NaN or infinite values: {state.tolist()}")
        return state.to(self._device)

    def _text(self, batch: dict[str, Any], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        task = batch.get("task")
        if task is None:
            raise ValueError("batch is missing 'task' (the instruction strings)")
        task = [task] if isinstance(task, str) else list(task)
        if len(task) != size:
            raise ValueError(f"got {len(task)} instructions for a batch of {size}")
        c = self.config
        ids, grams, valid = encode(task, c.max_words, c.text_buckets, c.ngram_range, c.max_ngrams)
        if self.training and (c.word_dropout > 0 or c.word_position_jitter > 0):
            ids, grams, valid = augment(ids, grams, valid, c.word_dropout, c.word_position_jitter)
        if self.training and c.word_insertion > 0:
            ids, grams, valid = insert_unknown(ids, grams, valid, c.word_insertion, c.text_buckets)
        # Trailing columns that are padding in every row change nothing (padding is never a
        # key, and nobody reads a padding token's output): drop them to save compute.
        used = valid.any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        return tuple(t[:, :width].to(self._device) for t in (ids, grams, valid))

    @property
    def _device(self) -> torch.device:
        return self.model.text.embed.weight.device

    def train(self, mode: bool = True) -> VLAPolicy:
        super().train(mode)
        if self.config.vision == "scene" and self.config.freeze_vision:
            self.model.scene_encoder.eval()  # a frozen encoder's BatchNorm keeps its statistics
        return self

    def encode_scene(self, batch: dict[str, Any], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """vision="scene": the encoder's standardised object positions ``(B, n)`` and features
        ``(B, hidden)`` for a batch: taken from the batch when it carries them (cached by
        ``perception.encode_frames``), else computed from its images and state."""
        if self.config.vision != "scene":
            raise ValueError(f"encode_scene needs vision='scene'; this policy has vision={self.config.vision!r}")
        if SCENE_POSITIONS in batch and SCENE_FEATURES in batch:
            positions = torch.as_tensor(batch[SCENE_POSITIONS]).float().to(self._device)
            features = torch.as_tensor(batch[SCENE_FEATURES]).float().to(self._device)
            return positions, features
        images, state = self._images(batch), self.scene_state_norm.normalize(self._raw_state(batch))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.model.scene_encoder(images, state)

    def scene_target(self, batch: dict[str, Any]) -> torch.Tensor:
        """The scene encoder's standardised training target from ``observation.environment_state``."""
        if OBS_ENV_STATE not in batch:
            raise ValueError("training the scene encoder needs 'observation.environment_state' in the batch")
        scene = torch.as_tensor(batch[OBS_ENV_STATE]).float()
        return self.scene_target_norm.normalize(scene[:, self.config.scene_indices].to(self._device))

    def _visual(self, batch: dict[str, Any]) -> torch.Tensor:
        """The prefix's visual tokens ``(B, V, D)``."""
        if self.config.vision == "conv":
            return self.model.conv_tokens(self._images(batch))
        positions, features = self.encode_scene(batch, grad=not self.config.freeze_vision)
        metres = self.scene_target_norm.unnormalize(positions)
        grip = self._raw_state(batch)[:, :3]
        return self.model.scene_tokens((positions, metres), features, grip)

    def batch_from_observation(self, obs: dict[str, Any]) -> dict[str, Any]:
        """A Gymnasium observation (one env, or stacked by a vector env) as a batch."""
        if "pixels" not in obs:
            raise ValueError(f"observation has no 'pixels'; the VLA needs cameras {list(self.config.cameras)}")
        for key in ("agent_pos", "instruction"):
            if key not in obs:
                raise ValueError(f"observation has no {key!r}; it has {sorted(obs)} (the tabletop envs' contract)")
        state = np.asarray(obs["agent_pos"], dtype=np.float32)
        single = state.ndim == 1
        batch: dict[str, Any] = {OBS_STATE: torch.from_numpy(np.atleast_2d(state))}
        size = self.config.image_size
        for camera in self.config.cameras:
            if camera not in obs["pixels"]:
                raise ValueError(f"observation is missing camera {camera!r}; it has {sorted(obs['pixels'])}")
            image = np.asarray(obs["pixels"][camera])
            image = image[None] if single else image
            if image.ndim != 4 or image.shape[1:] != (size, size, 3):
                raise ValueError(f"camera {camera!r} image must be ({size}, {size}, 3) uint8, got {image.shape[1:]}")
            if image.dtype != np.uint8:
                raise ValueError(
                    f"camera {camera!r} image has dtype {image.dtype}; observations carry uint8 images in "
                    "[0, 255] (the envs' contract). Floats in [0, 1]: pass (image * 255).round().astype(np.uint8)"
                )
            batch[image_key(camera)] = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0
        instruction = obs["instruction"]
        tasks = [instruction] if isinstance(instruction, str) else instruction
        if isinstance(tasks, np.ndarray):
            tasks = tasks.tolist()
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"observation 'instruction' must be a string (one per env), got {instruction!r}")
        rows = batch[OBS_STATE].shape[0]
        if len(tasks) != rows:
            raise ValueError(f"{len(tasks)} instructions for a batch of {rows} observations; give one per observation")
        batch["task"] = list(tasks)
        return batch

    # -- training -----------------------------------------------------------------

    def forward(self, batch: dict[str, Any], step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The flow-matching loss of a training batch (plus MoE balance losses when upcycled)."""
        c = self.config
        state = self._state(batch)
        visual = self._visual(batch)
        text = self._text(batch, state.shape[0])
        actions = self.action_norm.normalize(torch.as_tensor(batch[ACTION]).float().to(self._device))
        is_pad = torch.as_tensor(batch["action_is_pad"]).bool().to(self._device)
        prefix, prefix_valid = self.model.embed_prefix(visual, text)
        cache = self.model.prefix_cache(prefix, prefix_valid)

        k = c.flow_samples  # several (t, noise) draws per encoded prefix
        repeat = lambda x: x.repeat_interleave(k, dim=0)
        cache = [(repeat(kk), repeat(vv)) for kk, vv in cache]
        actions, is_pad = repeat(actions), repeat(is_pad)
        noise = torch.randn_like(actions)
        t = sample_time(actions.shape[0], c.time_beta, c.time_min).to(actions.device)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        suffix = self.model.action_expert.embed(repeat(state), x_t, t)
        output = self.model.expert_cached(cache, repeat(prefix_valid), suffix)
        loss = flow_matching_loss(output, noise, actions, is_pad, t, c.prediction)
        logs = {"flow_loss": float(loss.detach())}
        consistency = adamoe.consistency_coef(self)
        if consistency > 0 and self.training:  # THOR: a second pass routes every token anew
            second = self.model.expert_cached(cache, repeat(prefix_valid), suffix)
            gap = (output - second).pow(2).mean()
            loss = 0.5 * (loss + flow_matching_loss(second, noise, actions, is_pad, t, c.prediction))
            loss = loss + consistency * gap
            logs["consistency_loss"] = float(gap.detach())
        if self.model.scene_readout is not None:
            if OBS_ENV_STATE not in batch:
                raise ValueError("scene_aux_dim > 0 needs 'observation.environment_state' in training batches")
            target = self.scene_norm.normalize(torch.as_tensor(batch[OBS_ENV_STATE]).float())
            image_tokens = len(c.cameras) * c.tokens_per_image
            readout = self.model.scene_readout(prefix[:, :image_tokens].flatten(1))
            scene_loss = F.mse_loss(readout, target.to(readout.device))
            loss = loss + c.scene_aux_weight * scene_loss
            logs["scene_loss"] = float(scene_loss.detach())
        aux, aux_logs = adamoe.moe_aux_loss(self, step)
        if aux is not None:
            loss = loss + aux
            logs.update(aux_logs)
        return loss, logs

    # -- inference ----------------------------------------------------------------

    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        use_cache: bool = True,
        num_steps: int | None = None,
        prefix: torch.Tensor | np.ndarray | None = None,
        prefix_weights: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """``(B, H, action_dim)`` unnormalised actions, integrated from noise with Euler steps
        (``config.inference_noise_scale`` times a standard normal unless ``noise`` is given).

        ``prefix`` (``(P, action_dim)`` or ``(B, P, action_dim)`` unnormalised actions, P <= H)
        inpaints the chunk's first P actions (real-time chunking, training-free): at every
        step the clean-chunk estimate is pulled toward the prefix by ``prefix_weights`` (``(P,)``
        in [0, 1]; default all 1), so a weight of 1 ends exactly on the prefix action and the
        rest of the chunk is generated to continue it."""
        c = self.config
        guide = weights = None
        if prefix is not None:
            guide, weights = self._inpainting(prefix, prefix_weights)
        state = self._state(batch)
        prefix, prefix_valid = self.model.embed_prefix(self._visual(batch), self._text(batch, state.shape[0]))
        cache = self.model.prefix_cache(prefix, prefix_valid) if use_cache else None
        b = state.shape[0]
        if noise is None:
            x = c.inference_noise_scale * torch.randn(b, c.chunk_size, c.action_dim, device=self._device)
        else:  # the caller's noise, as given
            x = noise.to(self._device)
        steps = num_steps or c.num_inference_steps
        dt = -1.0 / steps
        for i in range(steps):
            t = torch.full((b,), 1.0 + i * dt, device=self._device)
            suffix = self.model.action_expert.embed(state, x, t)

            def run(suffix: torch.Tensor = suffix) -> torch.Tensor:
                if use_cache:
                    return self.model.expert_cached(cache, prefix_valid, suffix)
                return self.model.expert_joint(prefix, prefix_valid, suffix)

            if c.self_contrast_beta > 0 and c.moe is not None:  # SCMoE: strong minus weak routing
                strong_k, weak_k = c.self_contrast_k
                with adamoe.routing_top_k(self, strong_k):
                    strong = velocity(run(), x, t, c.prediction)
                with adamoe.routing_top_k(self, weak_k):
                    weak = velocity(run(), x, t, c.prediction)
                v = (1 + c.self_contrast_beta) * strong - c.self_contrast_beta * weak
            else:
                v = velocity(run(), x, t, c.prediction)
            if guide is not None:  # pull the clean estimate x_t - t v toward the prefix, step by step
                tt = t.reshape(-1, 1, 1)
                clean = x - tt * v
                p = guide.shape[1]
                clean[:, :p] = clean[:, :p] + weights * (guide - clean[:, :p])
                v = (x - clean) / tt
            x = x + dt * v
        actions = self.action_norm.unnormalize(x)
        if not self._stats_checked:
            self._stats_checked = True
            if not (self.state_norm.fitted and self.action_norm.fitted):
                warnings.warn(
                    "this policy's state/action normalisation statistics were never set: its actions are on the "
                    "wrong scale. Call set_normalization(dataset.stats()) before training, or load a trained "
                    "checkpoint.",
                    UserWarning,
                    stacklevel=3,  # the caller of predict_action_chunk (no_grad's wrapper is one frame)
                )
        if not torch.isfinite(actions).all():
            raise RuntimeError("the policy produced non-finite actions; check the checkpoint's statistics")
        return actions

    def _inpainting(
        self, prefix: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix in normalised action space ``(1 or B, P, A)`` and its weights ``(P, 1)``."""
        c = self.config
        guide = torch.as_tensor(np.asarray(prefix, dtype=np.float32), device=self._device)
        guide = guide[None] if guide.ndim == 2 else guide
        if guide.ndim != 3 or guide.shape[-1] != c.action_dim or not 0 < guide.shape[1] <= c.chunk_size:
            raise ValueError(
                f"prefix must be (P, {c.action_dim}) or (B, P, {c.action_dim}) with 0 < P <= {c.chunk_size}, "
                f"got shape {tuple(guide.shape)}"
            )
        if not torch.isfinite(guide).all():
            raise ValueError("prefix holds NaN or inf")
        p = guide.shape[1]
        w = torch.ones(p) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.shape != (p,) or not torch.isfinite(w).all() or (w < 0).any() or (w > 1).any():
            raise ValueError(f"prefix_weights must be {p} numbers in [0, 1], got {w.tolist()}")
        return self.action_norm.normalize(guide), w.to(self._device).reshape(p, 1)

    def reset(self) -> None:
        """Clear the action queue (call at every episode start)."""
        self._queue.clear()

    @torch.no_grad()
    def select_action(self, obs: dict[str, Any]) -> np.ndarray:
        """The next action for an observation: ``(action_dim,)``, or ``(B, action_dim)`` for a
        vector env's batch; a new chunk is predicted when the queue runs empty, and its first
        ``n_action_steps`` actions are queued."""
        batch = obs if OBS_STATE in obs else self.batch_from_observation(obs)
        single = "agent_pos" in obs and np.asarray(obs["agent_pos"]).ndim == 1
        if not self._queue:
            chunk = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]  # (B, n, A)
            self._queue.extend(chunk.transpose(0, 1).cpu().numpy())
        action = self._queue.popleft()
        return action[0] if single else action
