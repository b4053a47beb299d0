"""The Decision Transformer: Hugging Face parity, multi-task form, data, training, Fisher,
merging (by averaging and into MoE), checkpoints and the merging command line."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

import adamoe
from adamoe import fisher_diagonal
from envs.datasets import write_dataset
from policies import DecisionTransformer, DecisionTransformerConfig, DTTask, from_pretrained
from policies.dt.data import OfflineData, Trajectory, WindowSampler, load_offline, window_sampler
from policies.dt.evaluation import normalized_return, run_episodes
from policies.dt.merging import BODY_PLAN, dt_fisher, merge_into_moe, merge_specialists, plan_from
from policies.dt.recipe import build_model
from policies.dt.training import DTTrainConfig, set_state_stats, specialist_from, train_dt
from tests.conftest import run_script

transformers = pytest.importorskip("transformers")


def _hf_model(**overrides):
    config = transformers.DecisionTransformerConfig(
        state_dim=11, act_dim=3, hidden_size=32, n_layer=2, n_head=2, max_ep_len=100, n_positions=64, **overrides
    )
    return transformers.DecisionTransformerModel(config).eval(), config


def _inputs(b: int = 3, length: int = 7, state_dim: int = 11, act_dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded window
    return (
        torch.randn(b, length, state_dim, generator=g),
        torch.randn(b, length, act_dim, generator=g),
        torch.randn(b, length, 1, generator=g),
        torch.randint(0, 100, (b, length), generator=g),
        mask,
    )


@pytest.mark.parametrize("activation", ["relu", "gelu_new"])
def test_hugging_face_state_dict_loads_and_gives_identical_predictions(activation):
    torch.manual_seed(0)
    hf, hf_config = _hf_model(activation_function=activation)
    ours = DecisionTransformer(DecisionTransformerConfig.from_hf(hf_config)).eval()
    ours.load_state_dict(hf.state_dict())  # Hugging Face names load as they are
    s, a, r, t, m = _inputs()
    with torch.no_grad():
        ref = hf(states=s, actions=a, returns_to_go=r, timesteps=t, attention_mask=m)
        out = ours(s, a, r, t, m)
    valid = m.bool()
    for name in ("action_preds", "state_preds", "return_preds"):
        torch.testing.assert_close(getattr(out, name)[valid], getattr(ref, name)[valid], rtol=0, atol=1e-6)


def test_hugging_face_body_names_are_kept_and_task_modules_move_under_their_task():
    hf, hf_config = _hf_model()
    ours = DecisionTransformer(DecisionTransformerConfig.from_hf(hf_config, task="hopper"))
    ours.load_hf_state_dict(hf.state_dict())
    hf_names = set(hf.state_dict())
    our_names = {n.replace("tasks.hopper.", "") for n in ours.state_dict()} - {"state_mean", "state_std"}
    assert our_names == hf_names
    assert "encoder.h.1.mlp.c_fc.weight" in ours.state_dict()
    torch.testing.assert_close(ours.tasks["hopper"].embed_state.weight, hf.embed_state.weight)


def test_get_action_pads_short_histories_like_the_reference_evaluation():
    torch.manual_seed(0)
    hf, hf_config = _hf_model()
    ours = DecisionTransformer(DecisionTransformerConfig.from_hf(hf_config, context_length=5)).eval()
    ours.load_state_dict(hf.state_dict())
    s, a, r, t, _ = _inputs(b=2, length=3)
    action = ours.get_action(s, a, r, t)
    pad = lambda x: torch.cat([x.new_zeros(x.shape[0], 2, *x.shape[2:]), x], 1)  # noqa: E731
    mask = torch.tensor([[0, 0, 1, 1, 1]] * 2)
    with torch.no_grad():
        ref = hf(states=pad(s), actions=pad(a), returns_to_go=pad(r), timesteps=pad(t), attention_mask=mask)
    torch.testing.assert_close(action, ref.action_preds[:, -1], rtol=0, atol=1e-6)
    assert action.abs().max() <= 1.0  # tanh head


def test_defaults_are_the_reference_hyper_parameters():
    config = DecisionTransformerConfig(tasks=[DTTask("t", 3, 2)])
    assert (config.context_length, config.n_layer, config.hidden_size, config.n_head) == (20, 3, 128, 1)
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1
    train = DTTrainConfig()
    assert (train.lr, train.weight_decay, train.grad_clip) == (1e-4, 1e-4, 0.25)
    assert train.warmup_steps > 0


def test_tasks_of_different_sizes_share_one_body():
    config = DecisionTransformerConfig(
        tasks=[DTTask("halfcheetah", 17, 6), DTTask("hopper", 11, 3)], hidden_size=32, n_layer=2
    )
    model = DecisionTransformer(config).eval()
    body = [n for n in model.state_dict() if not n.startswith("tasks.")]
    assert body and all(n.startswith(("encoder.", "embed_timestep", "embed_ln")) for n in body)
    batches = {}
    for task, (sd, ad) in {"halfcheetah": (17, 6), "hopper": (11, 3)}.items():
        s, a, r, t, m = _inputs(b=2, length=5, state_dim=sd, act_dim=ad)
        batches[task] = {"states": s, "actions": a, "returns_to_go": r, "timesteps": t, "attention_mask": m}
    together = model.forward_tasks(batches)
    for task, b in batches.items():
        alone = model(b["states"], b["actions"], b["returns_to_go"], b["timesteps"], b["attention_mask"], task=task)
        valid = b["attention_mask"].bool()
        torch.testing.assert_close(together[task].action_preds[valid], alone.action_preds[valid])
    assert together["halfcheetah"].action_preds.shape == (2, 5, 6)
    with pytest.raises(ValueError, match="takes states"):
        model(
            batches["hopper"]["states"],
            batches["hopper"]["actions"],
            batches["hopper"]["returns_to_go"],
            batches["hopper"]["timesteps"],
            task="halfcheetah",
        )
    with pytest.raises(ValueError, match="unknown task 'walker'"):
        model.get_action(
            batches["hopper"]["states"],
            batches["hopper"]["actions"],
            batches["hopper"]["returns_to_go"],
            batches["hopper"]["timesteps"],
            task="walker",
        )


def test_bad_configs_name_the_bad_value():
    with pytest.raises(ValueError, match="at least one task"):
        DecisionTransformerConfig()
    with pytest.raises(ValueError, match="task name 'a.b'"):
        DecisionTransformerConfig(tasks=[DTTask("a.b", 3, 2)])
    with pytest.raises(ValueError, match="unique"):
        DecisionTransformerConfig(tasks=[DTTask("a", 3, 2), DTTask("a", 3, 2)])
    with pytest.raises(ValueError, match="divisible"):
        DecisionTransformerConfig(tasks=[DTTask("a", 3, 2)], hidden_size=30, n_head=4)
    with pytest.raises(ValueError, match="unknown DecisionTransformerConfig fields"):
        DecisionTransformerConfig.from_dict({"tasks": [{"name": "a", "state_dim": 3, "act_dim": 2}], "n_embd": 4})


def _trajectory(length: int, state_dim: int = 3, act_dim: int = 2, seed: int = 0) -> Trajectory:
    rng = np.random.default_rng(seed)
    return Trajectory(
        states=rng.normal(size=(length, state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
        rewards=rng.normal(size=length).astype(np.float32),
    )


def test_windows_are_left_padded_with_returns_to_go_to_the_episode_end():
    traj = _trajectory(6)
    data = OfflineData("toy", [traj], "")
    sampler = WindowSampler(
        data, context_length=4, return_scale=2.0, state_mean=np.zeros(3), state_std=np.ones(3), max_ep_len=100
    )
    batch = sampler.sample(64, np.random.default_rng(0))
    rtg = np.cumsum(traj.rewards[::-1])[::-1] / 2.0
    for i in range(64):
        mask = batch["attention_mask"][i].numpy().astype(bool)
        steps = batch["timesteps"][i].numpy()[mask]
        assert mask[-1] and (np.diff(mask.astype(int)) >= 0).all()  # padding only on the left
        np.testing.assert_allclose(batch["states"][i].numpy()[mask], traj.states[steps], rtol=1e-6)
        np.testing.assert_allclose(batch["returns_to_go"][i, :, 0].numpy()[mask], rtg[steps], rtol=1e-5)
        assert (batch["states"][i].numpy()[~mask] == 0).all()
        assert (np.diff(steps) == 1).all()


def _locomotion_dataset(root: Path, episodes: int = 3, steps: int = 30) -> str:
    """A small HalfCheetah-v5 dataset written the way the public mujoco/* datasets are."""
    env = gym.make("HalfCheetah-v5", max_episode_steps=steps)
    buffers = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        env.action_space.seed(ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            observations.append(obs), actions.append(action), rewards.append(reward)
            terms.append(terminated), truncs.append(truncated)
        buffers.append(
            EpisodeBuffer(
                id=ep,
                seed=ep,
                observations=np.stack(observations),
                actions=np.stack(actions),
                rewards=rewards,
                terminations=terms,
                truncations=truncs,
                infos={},
            )
        )
    write_dataset(
        "mujoco/halfcheetah/tiny-v0",
        buffers,
        [{} for _ in buffers],
        env.observation_space,
        env.action_space,
        env_spec=env.spec,
        root=root,
    )
    env.close()
    return "mujoco/halfcheetah/tiny-v0"


def test_any_minari_dataset_trains_by_id_or_path(tmp_path):
    dataset_id = _locomotion_dataset(tmp_path)
    by_id = load_offline(dataset_id, tmp_path)
    by_path = load_offline(tmp_path / dataset_id)
    assert (by_id.state_dim, by_id.act_dim, len(by_id.trajectories)) == (17, 6, 3)
    np.testing.assert_array_equal(by_id.trajectories[1].actions, by_path.trajectories[1].actions)
    assert by_id.env_id == "HalfCheetah-v5"
    model = build_model({"halfcheetah": by_id}, hidden_size=32, n_layer=1, context_length=5)
    history = train_dt(model, {"halfcheetah": by_id}, DTTrainConfig(steps=3, batch_size=4, log_every=1), progress=False)
    assert len(history) == 3 and all(np.isfinite(row["loss"]) for row in history)
    episodes = run_episodes("HalfCheetah-v5", 2, 0, lambda s, r, alive: np.zeros((len(alive), 6)), max_steps=5)
    assert [e["length"] for e in episodes] == [5, 5]
    assert normalized_return(-280.178953, {"random": -280.178953, "expert": 12135.0}) == 0.0
    with pytest.raises(FileNotFoundError, match="no Minari dataset 'mujoco/nothing-v0'"):
        load_offline("mujoco/nothing-v0", tmp_path)


def _toy_data(seed: int = 0) -> dict[str, OfflineData]:
    return {
        "a": OfflineData("a", [_trajectory(12, 3, 2, seed + i) for i in range(4)], ""),
        "b": OfflineData("b", [_trajectory(9, 5, 2, seed + 10 + i) for i in range(4)], ""),
    }


def _toy_model(data: dict[str, OfflineData], **kw) -> DecisionTransformer:
    torch.manual_seed(0)
    model = build_model(data, hidden_size=16, n_layer=2, context_length=4, max_ep_len=32, n_positions=16, **kw)
    return model


def test_a_specialist_trains_the_body_and_its_own_task_only():
    data = _toy_data()
    common = _toy_model(data)
    specialist = specialist_from(common, "a")
    train_dt(specialist, {"a": data["a"]}, DTTrainConfig(steps=3, batch_size=4, lr=1e-2, tasks=["a"]), progress=False)
    before, after = common.state_dict(), specialist.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("tasks.b."))
    assert not torch.equal(before["tasks.a.embed_state.weight"], after["tasks.a.embed_state.weight"])
    assert not torch.equal(before["encoder.h.0.mlp.c_fc.weight"], after["encoder.h.0.mlp.c_fc.weight"])
    assert specialist.config.role == "specialist:a"


def test_exact_fisher_of_a_decision_transformer_matches_the_per_sample_loop():
    data = _toy_data()
    model = _toy_model(data)
    sampler = window_sampler(model, "b", data["b"])
    batch = sampler.sample(6, np.random.default_rng(0))

    def mean_fn(m, b):
        return m(
            b["states"], b["actions"], b["returns_to_go"], b["timesteps"], b["attention_mask"], task="b"
        ).action_preds[:, -1]

    fast = fisher_diagonal(model, [batch], mean_fn, method="vmap", progress=False)
    slow = fisher_diagonal(model, [batch], mean_fn, method="loop", progress=False)
    assert set(fast) == set(slow)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-7)
    assert fast["tasks.a.embed_state.weight"].abs().max() == 0  # another task's embedding plays no part
    assert fast["encoder.h.0.attn.c_attn.weight"].sum() > 0


def _specialists(data):
    common = _toy_model(data)
    out = {}
    for i, task in enumerate(data):
        model = specialist_from(common, task)
        config = DTTrainConfig(steps=2, batch_size=4, lr=1e-2, tasks=[task], seed=i)
        train_dt(model, {task: data[task]}, config, progress=False)
        out[task] = model
    return common, out


def test_fisher_merge_round_trips_through_from_pretrained(tmp_path):
    data = _toy_data()
    common, specialists = _specialists(data)
    fishers = {t: dt_fisher(m, t, data[t], samples=8, batch_size=4, progress=False) for t, m in specialists.items()}
    merged = merge_specialists(specialists, "fisher", fishers=fishers)
    name = "encoder.h.1.attn.c_attn.weight"
    fa, fb = (fishers[t][name].double().clamp_min(1e-8) for t in ("a", "b"))
    ta, tb = (specialists[t].state_dict()[name].double() for t in ("a", "b"))
    torch.testing.assert_close(merged.state_dict()[name], ((fa * ta + fb * tb) / (fa + fb)).float())
    for task in ("a", "b"):  # each task keeps its specialist's embeddings and heads
        torch.testing.assert_close(
            merged.tasks[task].predict_action[0].weight, specialists[task].tasks[task].predict_action[0].weight
        )
    merged.save_pretrained(tmp_path / "merged")
    loaded = from_pretrained(tmp_path / "merged")
    assert isinstance(loaded, DecisionTransformer) and loaded.config.role == "merge:fisher"
    for key, value in merged.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    batch = {t: window_sampler(merged, t, data[t]).sample(3, np.random.default_rng(1)) for t in data}
    for t in data:
        torch.testing.assert_close(
            loaded.forward_tasks(batch)[t].action_preds, merged.forward_tasks(batch)[t].action_preds
        )


def test_every_averaging_method_merges_the_body_only():
    data = _toy_data()
    common, specialists = _specialists(data)
    sd = {t: m.state_dict() for t, m in specialists.items()}
    avg = merge_specialists(specialists, "average").state_dict()
    name = "embed_timestep.weight"
    torch.testing.assert_close(avg[name], (sd["a"][name] + sd["b"][name]) / 2)
    assert torch.equal(avg["encoder.wte.weight"], sd["a"]["encoder.wte.weight"])  # never read, never merged
    ta = merge_specialists(specialists, "task_arithmetic", base=common, scale=0.5).state_dict()
    base = common.state_dict()[name]
    torch.testing.assert_close(ta[name], base + 0.5 * ((sd["a"][name] - base) + (sd["b"][name] - base)))
    ties = merge_specialists(specialists, "ties", base=common, density=1.0).state_dict()
    assert ties[name].shape == base.shape
    with pytest.raises(ValueError, match="needs a Fisher for every specialist"):
        merge_specialists(specialists, "fisher", fishers={})
    assert plan_from(None) is BODY_PLAN
    assert plan_from("merge=^encoder\\.h\\.0\\.;keep=ln").merged_names(list(sd["a"])) == [
        n for n in sd["a"] if n.startswith("encoder.h.0.") and "ln" not in n
    ]


def test_specialists_of_different_models_fail_to_merge_with_a_named_mismatch():
    data = _toy_data()
    _, specialists = _specialists(data)
    other = build_model(data, hidden_size=8, n_layer=2, context_length=4, max_ep_len=32, n_positions=16)
    with pytest.raises(ValueError, match="parameter 'encoder.wpe.weight' has shape"):
        merge_specialists({"a": specialists["a"], "b": other}, "average")
    lonely = build_model(
        {"c": _toy_data()["a"]}, hidden_size=16, n_layer=2, context_length=4, max_ep_len=32, n_positions=16
    )
    with pytest.raises(ValueError, match="specialist for 'c'"):
        merge_specialists({"a": specialists["a"], "c": lonely}, "average")


def test_merge_into_moe_uses_each_specialists_mlp_as_an_expert_and_reloads(tmp_path):
    data = _toy_data()
    common, specialists = _specialists(data)
    moe = merge_into_moe(specialists, generator=torch.Generator().manual_seed(0))
    layers = adamoe.moe_layers(moe)
    assert sorted(layers) == ["encoder.h.0.mlp", "encoder.h.1.mlp"]
    for i, task in enumerate(("a", "b")):
        mlp = specialists[task].encoder.h[1].mlp
        torch.testing.assert_close(layers["encoder.h.1.mlp"].experts.w_in[i], mlp.c_fc.weight)
        torch.testing.assert_close(layers["encoder.h.1.mlp"].experts.b_out[i], mlp.c_proj.bias)
    before = {n: p.clone() for n, p in moe.named_parameters()}
    router = {id(p) for p in adamoe.router_parameters(moe)}
    train_dt(moe, data, DTTrainConfig(steps=3, batch_size=4, lr=1e-2, trainable="router"), progress=False)
    for n, p in moe.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in router), n  # only routers and scale adapters moved
    moe.save_pretrained(tmp_path / "moe")
    loaded = from_pretrained(tmp_path / "moe")
    assert loaded.config.moe["layers"] == [0, 1]
    batch = {t: window_sampler(moe, t, data[t]).sample(3, np.random.default_rng(2)) for t in data}
    for t in data:
        torch.testing.assert_close(
            loaded.forward_tasks(batch)[t].action_preds, moe.forward_tasks(batch)[t].action_preds
        )
    assert moe.num_parameters(active=True) < moe.num_parameters()


def test_merge_command_writes_a_checkpoint_and_computes_missing_fishers(tmp_path):
    data = _toy_data()
    # Datasets on disk, so the command can compute each specialist's Fisher from its task's data.
    root = tmp_path / "datasets"
    for task, d in data.items():
        space_s = gym.spaces.Box(-np.inf, np.inf, (d.state_dim,), np.float32)
        space_a = gym.spaces.Box(-1, 1, (d.act_dim,), np.float32)
        buffers = [
            EpisodeBuffer(
                id=i,
                observations=np.concatenate([t.states, t.states[-1:]]),
                actions=t.actions,
                rewards=list(t.rewards),
                terminations=[False] * len(t),
                truncations=[False] * len(t),
                infos={},
            )
            for i, t in enumerate(d.trajectories)
        ]
        write_dataset(f"toy/{task}/data-v0", buffers, [{}] * len(buffers), space_s, space_a, root=root)
        data[task] = load_offline(f"toy/{task}/data-v0", root)
    common = build_model(data, hidden_size=16, n_layer=2, context_length=4, max_ep_len=32, n_positions=16)
    dirs = []
    for task in data:
        model = specialist_from(common, task)
        train_dt(model, {task: data[task]}, DTTrainConfig(steps=2, batch_size=4, tasks=[task]), progress=False)
        dirs.append(str(model.save_pretrained(tmp_path / "specialists" / task)))
    common.save_pretrained(tmp_path / "common")
    out = tmp_path / "merged"
    run_script(
        "merge.py", "--checkpoints", *dirs, "--method", "fisher", "--root", root, "--output", out, "--fisher-samples", 8
    )
    assert all((Path(d) / "fisher.safetensors").is_file() for d in dirs)  # computed once, kept for next time
    merged = from_pretrained(out)
    assert merged.config.role == "merge:fisher"
    assert json.loads((Path(out) / "merge.json").read_text())["tasks"] == ["a", "b"]
    out = tmp_path / "ties"
    run_script("merge.py", "--checkpoints", *dirs, "--method", "ties", "--base", tmp_path / "common", "--output", out)
    assert from_pretrained(out).config.role == "merge:ties"
    out = tmp_path / "moe"
    args = ["--root", root, "--output", out, "--router-steps", 2, "--batch-size", 4]
    run_script("merge.py", "--checkpoints", *dirs, "--method", "moe", *args)
    assert from_pretrained(out).config.moe is not None


def test_state_normalisation_is_saved_with_the_model(tmp_path):
    data = _toy_data()
    model = _toy_model(data)
    set_state_stats(model, data)
    mean, std = data["b"].state_stats()
    np.testing.assert_allclose(model.tasks["b"].state_mean.numpy(), mean, rtol=1e-6)
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.tasks["b"].state_std, model.tasks["b"].state_std)
    assert loaded.config.task("b").return_scale == model.config.task("b").return_scale


def test_train_command_takes_a_dataset_path_and_fine_tunes_a_specialist(tmp_path):
    dataset_id = _locomotion_dataset(tmp_path, episodes=2, steps=20)
    path = str(tmp_path / dataset_id)
    small = ["--steps", "2", "--batch-size", "4", "--hidden-size", "16", "--n-layer", "1", "--context-length", "4"]
    common = tmp_path / "common"
    run_script("train_dt.py", "--dataset", f"cheetah={path}", "--output-dir", common, *small)
    model = from_pretrained(common)
    assert model.config.task("cheetah").env_id == "HalfCheetah-v5"
    assert (tmp_path / "common-logs" / "metrics.jsonl").is_file()
    out = tmp_path / "spec"
    args = ["--init", common, "--task", "cheetah", "--output-dir", out, "--steps", 2, "--batch-size", 4]
    run_script("train_dt.py", "--dataset", f"cheetah={path}", *args)
    assert from_pretrained(out).config.role == "specialist:cheetah"
    args = ["--dataset", f"cheetah={path}", "--init", common, "--output-dir", tmp_path / "x"]
    proc = run_script("train_dt.py", *args, check=False)
    assert proc.returncode != 0 and "--init needs --task" in proc.stderr


def test_merge_experiment_quick_run_writes_its_table_plot_and_checkpoints(tmp_path):
    from policies.dt.experiment import QUICK, MergeExperimentConfig, run

    out = tmp_path / "run"
    result = run(MergeExperimentConfig(**QUICK, output_dir=str(out)))
    rows = ("specialist", "common", "average", "fisher", "task_arithmetic", "ties", "moe")
    assert set(result["rows"]) == set(rows)
    assert result["tasks"] == ["reach-red", "pick-red"]
    for row in rows:
        for task in result["tasks"]:
            cell = result["rows"][row][task]
            assert len(cell["normalized_return"]) == 1 and 0.0 <= cell["success"][0] <= 1.0
    assert (out / "plots" / "normalized_return.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| Fisher merge |" in table and "Fisher merge minus uniform average" in table
    for method in ("average", "fisher", "task_arithmetic", "ties", "moe"):
        assert from_pretrained(out / "seed0" / "merged" / method).config.role.startswith("merge:")
    seed = out / "seed0"
    weights = {p: p.read_bytes() for p in seed.glob("**/model.safetensors")}
    evaluated = {p: p.stat().st_mtime_ns for p in (seed / "eval").glob("*.json")}
    run_script("dt_merge.py", "--quick", "--output-dir", out)  # a second run reuses every stage
    assert {p: p.read_bytes() for p in seed.glob("**/model.safetensors")} == weights
    assert {p: p.stat().st_mtime_ns for p in (seed / "eval").glob("*.json")} == evaluated
    # Other TIES settings rebuild that merge and its evaluation only, and say so.
    said = run_script("dt_merge.py", "--quick", "--output-dir", out, "--ties-density", "0.5").stdout
    assert "merge ties: settings changed since" in said and "eval ties: settings changed since" in said
    changed = {p.relative_to(seed).parts[:2] for p, b in weights.items() if p.read_bytes() != b}
    assert changed == {("merged", "ties")}
    assert [p.name for p, m in evaluated.items() if p.stat().st_mtime_ns != m] == ["ties.json"]
    # More specialist steps retrain every specialist and rebuild every merge, not the common one.
    run_script("dt_merge.py", "--quick", "--output-dir", out, "--specialist-steps", str(QUICK["specialist_steps"] + 1))
    changed = {p.relative_to(seed).parts[0] for p, b in weights.items() if p.read_bytes() != b}
    assert changed == {"specialists", "merged"}
    # Datasets collected with another episode count are refused by name, not silently reused.
    proc = run_script("dt_merge.py", "--quick", "--output-dir", out, "--episodes-per-task", "7", check=False)
    assert proc.returncode == 2 and "holds 6 episodes per noise level" in proc.stderr
