"""Configuration of the pi0-style VLA policy, with named presets (``tiny``, ``small``, ``base``)."""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from adamoe import MoAConfig, MoEConfig
from adamoe.config import JSONConfig

VISIONS = ("scene", "conv")
WORD_POSITIONS = ("learned", "fraction", "none")


@dataclass
class VLAConfig(JSONConfig):
    """Every hyper-parameter of :class:`policies.VLAPolicy`; ``config.json`` is this, as a dict.

    The prefix transformer (vision + language) and the action expert have the same depth
    and head layout, because at every layer the action expert's queries attend over the
    prefix's keys and values of that layer (pi0's shared attention, separate weights).
    """

    type: str = "vla"
    # Observations and actions.
    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 64
    state_dim: int = 4
    action_dim: int = 4
    chunk_size: int = 10  # H: actions predicted per chunk
    # Actions executed from each chunk before the next is predicted. Measured on the tabletop
    # suite (docs/pretraining.md): 2 beats 5 by 22 and 14 points on the push tasks and
    # changes no other task.
    n_action_steps: int = 2
    # Vision. "scene" (the default): a scene encoder trained first on the simulator's
    # object positions (its own stage, ``policies/vla/perception.py``), whose predicted
    # positions become one prefix token per object plus one token of its features;
    # measured, the only vision here that localises cubes to the ~1 cm control needs.
    # "conv": an end-to-end conv stem per camera (below), trained by the action loss.
    vision: str = "scene"
    scene_channels: tuple[int, ...] = (32, 32, 64)
    scene_strides: tuple[int, ...] = (2, 2, 1)
    scene_keypoints: int = 16
    scene_hidden: int = 256
    # What the scene encoder predicts: ``environment_state`` indices, one group per object
    # (tabletop: three cube centres xyz, then two pad centres xy). Labels in training only.
    scene_objects: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (21, 22), (23, 24))
    # Keep the scene encoder fixed while the policy trains (its outputs can then be cached
    # per frame: ``policies.vla.perception.encode_frames``).
    freeze_vision: bool = True
    # vision="conv": a conv stem per camera (shared weights, a learned camera embedding), each
    # image becoming a (image_size / patch) ^ 2 grid of tokens plus ``keypoints``
    # spatial-softmax tokens (the expected position of a learned feature each).
    vision_channels: tuple[int, ...] = (16, 32)
    patch: int = 32
    keypoints: int = 16
    # Language: one token per word, hashed (with its character n-grams) into
    # ``text_buckets`` embeddings: no vocabulary file, no unknown word.
    max_words: int = 16
    text_buckets: int = 4096
    ngram_range: tuple[int, int] = (3, 5)
    max_ngrams: int = 24
    # Training-only instruction augmentation (``policies.tokenizer.augment``): words dropped
    # with this probability, and the words shifted by up to this many positions. Off by
    # default: measured on the tabletop suite, 0.15 / 3 lowered held-out-phrasing success
    # from 70.0% to 60.5% (docs/pretraining.md).
    word_dropout: float = 0.0
    word_position_jitter: int = 0
    # Training-only (``policies.tokenizer.insert_unknown``): before each word, an unknown
    # word (random hashed ids) is inserted with this probability, so a policy learns to read
    # past words it never saw and to find known words at new places. Where a word sits:
    # "fraction" (its index as a fraction of the instruction's length, in Fourier features:
    # "early" and "late" mean the same in a long paraphrase as in a short one), "learned"
    # (one learned vector per index) or "none" (a bag of words). Measured on the tabletop
    # suite (docs/pretraining.md), these two defaults together raised held-out-phrasing
    # success from 62% to 99% at 4,000 steps.
    word_insertion: float = 0.15
    word_positions: str = "fraction"
    # 0: one prefix token per word; k > 0: k learned queries read the words and the prefix
    # carries those k tokens instead (fewer tokens, the same for every instruction).
    text_tokens: int = 0
    # Transformers.
    depth: int = 4
    num_heads: int = 4
    # Width 128: at 96 a step is ~1.5x faster, but the recipe's run at 12,000 steps lost the
    # held-out push paraphrase (18% and 0%; docs/pretraining.md, "Tried").
    head_dim: int = 32
    prefix_width: int = 128
    expert_width: int = 128
    mlp_ratio: float = 8 / 3  # gated MLP: 8 d^2 parameters, as a 4x plain MLP (Llama)
    dropout: float = 0.0
    # Flow matching (pi0): t ~ Beta(1.5, 1) squashed into (time_min, 1), N Euler steps.
    num_inference_steps: int = 10
    # The standard deviation of the noise sampling starts from: 1 samples the learned action
    # distribution; below 1 leans toward its mode, and 0 integrates from the mean, so a chunk
    # changes only with the observation (consecutive chunks agree; see docs/control.md).
    inference_noise_scale: float = 1.0
    time_beta: tuple[float, float] = (1.5, 1.0)
    time_min: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    # What the action expert outputs: "velocity" (pi0) or "actions", the clean chunk, from
    # which the sampler derives the velocity (x-prediction): on the tabletop demos it
    # learns several times faster per step (docs/vla.md, "Flow-matching parameterisation").
    prediction: str = "actions"
    # Noise draws per example in training: the prefix runs once and the cheap action
    # expert denoises several (t, noise) pairs, more signal per image encoded.
    flow_samples: int = 1
    # Training-only auxiliary target: regress the dataset's privileged
    # ``environment_state`` (object positions) from the image tokens, weighted by
    # ``scene_aux_weight``. It teaches the vision stem where things are far sooner than the
    # action loss alone; the policy never reads that state at inference. 0 turns it off.
    scene_aux_dim: int = 0
    scene_aux_weight: float = 1.0
    # Normalisation of state and actions from dataset statistics ("mean_std" or "min_max").
    normalization: str = "mean_std"
    # Self-contrast decoding (SCMoE) for an upcycled top-k policy: each Euler step uses
    # (1 + beta) * v_strong - beta * v_weak, the velocities under top-``self_contrast_k[0]``
    # and top-``self_contrast_k[1]`` routing. 0 turns it off.
    self_contrast_beta: float = 0.0
    self_contrast_k: tuple[int, int] = (2, 1)
    # Set by ``VLAPolicy.upcycle``: the action expert's FFNs are MoE layers with this
    # effective per-layer config (None for a dense policy).
    moe: dict[str, Any] | None = None
    # Set by ``VLAPolicy.upcycle_attention``: the action expert's attention layers are soft
    # attention experts (BAM) with this config (None: dense attention).
    attention_moe: dict[str, Any] | None = None
    preset: str = field(default="small")

    def __post_init__(self) -> None:
        if isinstance(self.cameras, str):
            raise ValueError(f"cameras={self.cameras!r} is a string; pass a tuple of names, e.g. ({self.cameras!r},)")
        self.cameras = tuple(self.cameras)
        self.vision_channels = tuple(self.vision_channels)
        self.scene_channels = tuple(self.scene_channels)
        self.scene_strides = tuple(self.scene_strides)
        self.scene_objects = tuple(tuple(group) for group in self.scene_objects)
        self.time_beta = tuple(self.time_beta)
        self.ngram_range = tuple(self.ngram_range)
        self.self_contrast_k = tuple(self.self_contrast_k)
        self.validate()

    def validate(self) -> None:
        if isinstance(self.cameras, str) or not self.cameras:
            raise ValueError(f"cameras must be a non-empty tuple of camera names, got {self.cameras!r}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras names a camera twice: {self.cameras!r}; name each once")
        positive = (
            "image_size",
            "state_dim",
            "action_dim",
            "chunk_size",
            "n_action_steps",
            "patch",
            "max_words",
            "text_buckets",
            "max_ngrams",
            "depth",
            "num_heads",
            "head_dim",
            "prefix_width",
            "expert_width",
            "num_inference_steps",
            "flow_samples",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size > 1024:
            raise ValueError(f"image_size must be at most 1024 pixels, got {self.image_size}")
        if self.vision not in VISIONS:
            raise ValueError(f"vision={self.vision!r} is not one of {VISIONS}")
        for name in ("scene_keypoints", "scene_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            not self.scene_channels
            or len(self.scene_strides) != len(self.scene_channels)
            or not all(isinstance(v, int) and v >= 1 for v in (*self.scene_channels, *self.scene_strides))
        ):
            raise ValueError(
                f"scene_channels and scene_strides must be equally long lists of positive integers, got "
                f"{self.scene_channels!r} and {self.scene_strides!r}"
            )
        groups = self.scene_objects
        if not groups or not all(1 <= len(g) <= 3 and all(isinstance(i, int) and i >= 0 for i in g) for g in groups):
            raise ValueError(
                f"scene_objects must be groups of 1 to 3 environment_state indices (one per object), got {groups!r}"
            )
        if not (isinstance(self.word_dropout, (int, float)) and 0.0 <= self.word_dropout < 1.0):
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout!r}")
        if not isinstance(self.word_position_jitter, int) or self.word_position_jitter < 0:
            raise ValueError(f"word_position_jitter must be an integer >= 0, got {self.word_position_jitter!r}")
        if not (isinstance(self.word_insertion, (int, float)) and 0.0 <= self.word_insertion < 1.0):
            raise ValueError(f"word_insertion must be in [0, 1), got {self.word_insertion!r}")
        if not isinstance(self.text_tokens, int) or isinstance(self.text_tokens, bool) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an integer >= 0, got {self.text_tokens!r}")
        if self.text_tokens and self.prefix_width % self.num_heads:
            raise ValueError(
                f"text_tokens={self.text_tokens} pools the words with {self.num_heads}-head attention over "
                f"prefix_width={self.prefix_width}, which needs prefix_width divisible by num_heads"
            )
        if self.word_positions not in WORD_POSITIONS:
            raise ValueError(f"word_positions={self.word_positions!r} is not one of {WORD_POSITIONS}")
        if not isinstance(self.scene_aux_dim, int) or self.scene_aux_dim < 0:
            raise ValueError(f"scene_aux_dim must be an integer >= 0, got {self.scene_aux_dim!r}")
        if self.scene_aux_dim and self.vision != "conv":
            raise ValueError(
                f"scene_aux_dim={self.scene_aux_dim} reads out the conv stem's image tokens; it needs vision='conv' "
                f"(vision={self.vision!r} trains its scene encoder on positions in its own stage)"
            )
        if not isinstance(self.keypoints, int) or self.keypoints < 0:
            raise ValueError(f"keypoints must be an integer >= 0, got {self.keypoints!r}")
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f"n_action_steps={self.n_action_steps} exceeds chunk_size={self.chunk_size}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch={self.patch}")
        stride = 2 ** len(self.vision_channels)
        if self.patch % stride:
            raise ValueError(
                f"patch={self.patch} must be a multiple of 2 ** len(vision_channels) = {stride} "
                f"(each conv stage halves the image)"
            )
        if self.prediction not in ("velocity", "actions"):
            raise ValueError(f"prediction={self.prediction!r} is not one of ('velocity', 'actions')")
        if self.normalization not in ("mean_std", "min_max"):
            raise ValueError(f"normalization={self.normalization!r} is not one of ('mean_std', 'min_max')")
        scale = self.inference_noise_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 10.0:
            raise ValueError(f"inference_noise_scale must be a number in [0, 10], got {scale!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.self_contrast_beta < 0:
            raise ValueError(f"self_contrast_beta must be >= 0, got {self.self_contrast_beta!r}")
        if len(self.self_contrast_k) != 2 or not all(isinstance(k, int) and k >= 1 for k in self.self_contrast_k):
            raise ValueError(f"self_contrast_k must be two expert counts (strong, weak), got {self.self_contrast_k!r}")
        for name, config_class in (("moe", MoEConfig), ("attention_moe", MoAConfig)):
            record = getattr(self, name)
            if record is None:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
                raise ValueError(
                    f"{name} must be None or a dict with a 'config' dict (as upcycling writes it), got {record!r}"
                )
            config_class.from_dict(record["config"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLAConfig:
        # A config.json written before a setting existed means what the code did then: an
        # end-to-end conv policy, one learned vector per word position, one token per word.
        legacy = {"vision": "conv", "word_positions": "learned", "word_insertion": 0.0, "text_tokens": 0}
        return super().from_dict({**legacy, **data})

    @property
    def scene_indices(self) -> list[int]:
        """The ``environment_state`` indices the scene encoder predicts, object after object."""
        return [i for group in self.scene_objects for i in group]

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch) ** 2 + self.keypoints


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: runs a training step in milliseconds.
    "tiny": dict(
        scene_channels=(8, 8),
        scene_strides=(2, 2),
        scene_keypoints=4,
        scene_hidden=32,
        vision_channels=(8, 16),
        patch=16,
        depth=2,
        num_heads=2,
        head_dim=8,
        prefix_width=32,
        expert_width=32,
        mlp_ratio=2.0,
        chunk_size=4,
        n_action_steps=2,
        flow_samples=2,
        num_inference_steps=3,
    ),
    # The default: trains to a useful tabletop policy on 2 CPU cores in minutes.
    "small": dict(),
    # Larger, for a GPU or a patient CPU.
    "base": dict(
        vision_channels=(32, 64, 128),
        patch=8,
        depth=6,
        num_heads=8,
        head_dim=32,
        prefix_width=256,
        expert_width=192,
        chunk_size=16,
        n_action_steps=8,
    ),
}


def vla_config(preset: str = "small", **overrides: Any) -> VLAConfig:
    """A config from a named preset, with any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VLA preset {preset!r}; valid presets are {sorted(PRESETS)}")
    known = {f.name for f in fields(VLAConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = ", ".join(f"{name!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for name, c in close.items())
        raise ValueError(f"VLAConfig has no field {hints}; see policies/vla/configuration_vla.py for the fields")
    return VLAConfig(**{**PRESETS[preset], **overrides, "preset": preset})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["depth=2", "cameras=('front',)"]`` -> config overrides (values as Python literals,
    anything else as a string), for command lines that take ``--set KEY=VALUE``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
