"""Training data, the training loop (schedule, resume, DDP) and evaluation rollouts."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from envs.collection import CollectionJob, dataset_id_for, run_collection
from policies import VLAPolicy, from_pretrained, vla_config
from policies.data import ChunkDataset, random_shift
from policies.evaluation import EvalConfig, evaluate, summarize
from policies.training import TrainConfig, lr_factor, parameter_groups, train

TASKS = ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PickBlue-v0"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla-datasets")
    run_collection(CollectionJob(env_ids=TASKS, episodes_per_task=2, root=str(root), workers=1), progress=False)
    return root


@pytest.fixture(scope="module")
def dataset(demo_root):
    return ChunkDataset([dataset_id_for(t) for t in TASKS], 4, ("front", "wrist"), root=demo_root, progress=False)


def tiny_policy(dataset, **overrides):
    torch.manual_seed(0)
    policy = VLAPolicy(vla_config("tiny", **overrides))
    policy.set_normalization(dataset.stats())
    return policy


def fast_config(**overrides):
    base = dict(steps=4, batch_size=4, warmup_steps=2, log_every=1, save_every=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


# -- data -----------------------------------------------------------------------------


def test_chunks_pad_past_the_episode_end_and_flag_it(dataset):
    end = int(dataset.frame_end[0])  # first episode: frames [0, end)
    batch = dataset.get(np.array([0, end - 2]))
    np.testing.assert_array_equal(batch["action"][0].numpy(), dataset.actions[0:4])
    assert batch["action_is_pad"][0].tolist() == [False] * 4
    assert batch["action_is_pad"][1].tolist() == [False, False, True, True]
    last = dataset.actions[end - 1]
    np.testing.assert_array_equal(batch["action"][1, 2:].numpy(), np.stack([last, last]))
    assert batch["observation.images.front"].shape == (2, 3, 64, 64)
    assert 0.0 <= batch["observation.images.front"].min() and batch["observation.images.front"].max() <= 1.0
    assert batch["task"][0] == dataset.episode_instruction[0]


def test_dataset_statistics_cover_state_and_action(dataset):
    stats = dataset.stats()
    np.testing.assert_allclose(stats["action"]["mean"], dataset.actions.mean(0), rtol=1e-5, atol=1e-6)
    assert stats["observation.state"]["std"].shape == (4,)


def test_random_shift_moves_images_by_whole_pixels():
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    torch.testing.assert_close(random_shift(image, 0), image)
    out = random_shift(image, 2, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), mode="replicate")
    for n in range(2):  # each output is some crop of its padded input
        crops = [padded[n, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[n], c) for c in crops)


def test_missing_camera_in_a_dataset_is_a_clear_error(demo_root):
    with pytest.raises(ValueError, match="no camera 'side'"):
        ChunkDataset([dataset_id_for(TASKS[0])], 4, ("side",), root=demo_root, progress=False)


# -- the loop -------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_moe_routers_get_their_own_learning_rate(dataset):
    policy = tiny_policy(dataset)
    policy.upcycle()
    groups = {g["name"]: g for g in parameter_groups(policy, TrainConfig(router_lr_scale=2.0))}
    assert groups["router"]["lr_scale"] == 2.0
    assert len(groups["router"]["params"]) == 2 * policy.config.depth  # W_r and W_s per layer
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] > 0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert (
        id(policy.model.text.embed.weight) in no_decay
        and id(policy.model.prefix_layers[0].input_norm.weight) in no_decay
    )


class OneBatch:
    """The same 8 frames every step: a loop that learns must fit them."""

    def __init__(self, dataset):
        self.batch = dataset.get(np.arange(0, 8 * 5, 5))

    def sample(self, batch_size, rng, shift):
        return self.batch


def test_training_reduces_the_loss_and_writes_metrics_plot_and_checkpoint(dataset, tmp_path):
    policy = tiny_policy(dataset)
    summary = train(policy, OneBatch(dataset), fast_config(steps=40, lr=3e-3, warmup_steps=5, save_every=20), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.5 * first
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = from_pretrained(summary["checkpoint"])
    batch = dataset.get(np.arange(3))
    noise = torch.randn(3, 4, 4)
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def test_the_scheduler_sets_every_step_s_learning_rate_across_a_pause(dataset, tmp_path):
    policy = tiny_policy(dataset)
    policy.upcycle(init="paper")  # adds the router group, at router_lr_scale times the rate
    cfg = fast_config(steps=6, warmup_steps=2, lr=1e-3, save_every=1)
    train(policy, dataset, cfg, tmp_path, stop_at=3)
    train(policy, dataset, cfg, tmp_path)  # resumes at step 3 on the same schedule
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * lr_factor(s, cfg) for s in range(6)])
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state" / "state.json").read_text())
    rates = {g["name"]: g["lr"] for g in state["param_groups"]}
    assert rates["router"] == pytest.approx(cfg.router_lr_scale * rates["decay"])


def test_resuming_continues_exactly_where_training_stopped(dataset, tmp_path):
    whole = tiny_policy(dataset)
    train(whole, dataset, fast_config(steps=4, ema_decay=0.9), tmp_path / "whole")
    part = tiny_policy(dataset)
    train(part, dataset, fast_config(steps=4, ema_decay=0.9), tmp_path / "part", stop_at=2)
    resumed = tiny_policy(dataset)  # a fresh process would start from scratch weights
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    train(resumed, dataset, fast_config(steps=4, ema_decay=0.9), tmp_path / "part")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resuming")
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_resuming_with_changed_settings_says_what_changed(dataset, tmp_path):
    train(tiny_policy(dataset), dataset, fast_config(steps=4, lr=1e-3), tmp_path, stop_at=2)
    with pytest.warns(UserWarning, match=r"differ from its run: steps 4 -> 6; lr 0\.001 -> 0\.002 \(pass"):
        train(tiny_policy(dataset), dataset, fast_config(steps=6, lr=2e-3, log_every=2), tmp_path)  # log_every: free


def test_metrics_after_a_resume_continue_from_the_resumed_step(dataset, tmp_path):
    train(tiny_policy(dataset), dataset, fast_config(steps=4), tmp_path, stop_at=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:  # logged after the checkpoint, then killed
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    train(tiny_policy(dataset), dataset, fast_config(steps=4), tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] != 9.0  # step 3 is the rerun's


@pytest.mark.parametrize("when", ["mid-step", "during the last save"])
def test_ctrl_c_saves_the_step_it_interrupts_and_ends_the_run(dataset, tmp_path, monkeypatch, when, ctrl_c_enabled):
    import os
    import signal

    import policies.training as training

    if when == "mid-step":  # arrives while step 2's batch is drawn: step 2 finishes and is saved
        draws = []

        class Interrupting:
            def sample(self, *args):
                draws.append(1)
                if len(draws) == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return dataset.sample(*args)

        data, stopped_at = Interrupting(), 2
    else:  # arrives while the final checkpoint is written: the run still says it was interrupted
        plot = training.plot_metrics
        monkeypatch.setattr(training, "plot_metrics", lambda *a: (plot(*a), os.kill(os.getpid(), signal.SIGINT))[0])
        data, stopped_at = dataset, 3
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=f"interrupted after step {stopped_at}, saved in"):
        train(tiny_policy(dataset), data, fast_config(steps=3, save_every=100), tmp_path)
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is given back
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state" / "state.json").read_text())
    assert state["step"] == stopped_at


def test_a_run_started_with_ctrl_c_ignored_keeps_it_ignored_and_trains_to_the_end(dataset, tmp_path):
    import os
    import signal

    class Interrupting:  # Ctrl-C arrives mid-run, as in a terminal the run was detached from
        def sample(self, *args):
            os.kill(os.getpid(), signal.SIGINT)
            return dataset.sample(*args)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as nohup or `cmd &` start it
    try:
        summary = train(tiny_policy(dataset), Interrupting(), fast_config(steps=3, save_every=100), tmp_path)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state" / "state.json").read_text())
    assert state["step"] == 3 and summary["checkpoint"]


def test_upcycled_policy_trains_and_reloads_as_upcycled(dataset, tmp_path):
    policy = tiny_policy(dataset)
    policy.upcycle(init="paper")
    summary = train(policy, dataset, fast_config(steps=3), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["balance_loss"] > 0
    loaded = from_pretrained(summary["checkpoint"])
    assert loaded.config.moe is not None and loaded.config.moe["init"] == "paper"


def _ddp_worker(rank, world, port, root, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    data = ChunkDataset([dataset_id_for(t) for t in TASKS], 4, ("front", "wrist"), root=root, progress=False)
    policy = tiny_policy(data)
    initial = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    train(policy, data, fast_config(steps=2, batch_size=4, save_every=100), out)
    final = torch.cat([p.detach().flatten() for p in policy.parameters()])
    results[rank] = (initial.numpy(), final.numpy())
    torch.distributed.destroy_process_group()


def test_two_process_ddp_step_keeps_replicas_identical(demo_root, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, str(demo_root), str(tmp_path), results), nprocs=2, join=True)
    (init0, final0), (init1, final1) = results[0], results[1]
    np.testing.assert_array_equal(init0, init1)
    assert not np.allclose(final0, init0)  # the step moved the weights
    np.testing.assert_allclose(final0, final1, rtol=0, atol=1e-6)  # ... identically on both ranks
    assert (tmp_path / "checkpoints" / "last" / "pretrained_model" / "model.safetensors").is_file()


def test_bad_training_config_names_the_value():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5).validate()


# -- evaluation -----------------------------------------------------------------------


def test_evaluation_writes_eval_info_and_a_video(dataset, tmp_path):
    policy = tiny_policy(dataset)
    result = evaluate(
        policy, [TASKS[0]], EvalConfig(episodes_per_task=3, max_envs=2, videos_per_task=1, video_size=64), tmp_path
    )
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert info == json.loads(json.dumps(result))
    assert len(info["per_episode"]) == 3 and {e["task"] for e in info["per_episode"]} == {"ReachRed"}
    assert len({e["seed"] for e in info["per_episode"]}) == 3
    assert set(info["per_episode"][0]) >= {"task", "seed", "return", "success", "instruction"}
    assert info["per_task"]["ReachRed"]["episodes"] == 3
    assert 0.0 <= info["aggregated"]["success_rate"] <= 1.0
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0


def test_heldout_evaluation_uses_the_heldout_phrasing(dataset, tmp_path):
    import envs

    policy = tiny_policy(dataset)
    result = evaluate(
        policy, [TASKS[0]], EvalConfig(episodes_per_task=1, instruction_split="heldout", videos_per_task=0)
    )
    assert result["per_episode"][0]["instruction"] in envs.TASKS["ReachRed"].instructions("heldout")


class ExpertPolicy:
    """The scripted expert behind the policy API, one per env of a vector env."""

    training = False

    def __init__(self, env_id: str, num_envs: int) -> None:
        import types

        import envs

        self.experts = [envs.make_expert(env_id) for _ in range(num_envs)]
        self.config = types.SimpleNamespace(cameras=(), image_size=64)  # state-only observations

    def eval(self) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        pass

    def reset(self) -> None:
        for expert in self.experts:
            expert.reset()

    def select_action(self, obs):
        rows = [{k: v[i] for k, v in obs.items()} for i in range(len(self.experts))]
        return np.stack([e.act(row) for e, row in zip(self.experts, rows, strict=True)])


def test_evaluation_records_the_stages_each_long_task_episode_reached(tmp_path):
    import envs

    env_id = envs.suite("tabletop-long")[0]
    config = EvalConfig(episodes_per_task=2, max_envs=2, videos_per_task=0)
    result = evaluate(ExpertPolicy(env_id, 2), [env_id], config, progress=False)
    for episode in result["per_episode"]:
        assert episode["success"] and episode["num_stages"] == 2
        assert episode["stages_done"] == episode["max_stages_done"] == 2
    assert result["per_task"][envs.task_name(env_id)]["stage_progress"] == 1.0
    assert result["aggregated"]["stage_progress"] == 1.0


def test_evaluation_runs_on_metaworld_tasks_with_the_policys_camera(tmp_path):
    pytest.importorskip("metaworld")
    policy = VLAPolicy(vla_config("tiny", cameras=("corner2",)))
    config = EvalConfig(episodes_per_task=1, videos_per_task=0)
    result = evaluate(policy, ["adamoe/MetaWorld-reach-v3"], config, tmp_path, progress=False)
    episode = result["per_episode"][0]
    assert episode["task"] == "reach-v3" and episode["length"] == 500  # an untrained policy runs out of time
    assert episode["sum_reward"] == episode["return"] and episode["max_reward"] <= 10
    assert result["aggregated"]["eval_s"] == result["wall_s"] > 0
    assert result["per_task"]["reach-v3"]["episodes"] == 1
    assert "stages_done" not in episode and "stage_progress" not in result["aggregated"]  # tabletop only
    assert (tmp_path / "eval_info.json").is_file()


def test_summary_aggregates_success_per_task_and_overall():
    eps = [
        {"task": "A", "return": -1.0, "success": True, "length": 5},
        {"task": "A", "return": -3.0, "success": False, "length": 9},
        {"task": "B", "return": -2.0, "success": True, "length": 7},
    ]
    s = summarize(eps)
    assert s["per_task"]["A"]["success_rate"] == 0.5 and s["per_task"]["B"]["success_rate"] == 1.0
    assert s["aggregated"]["success_rate"] == 0.75 and s["aggregated"]["episodes"] == 3
    # LeRobot's field names beside ours, so its tools read the file.
    assert s["aggregated"]["pc_success"] == 75.0 and s["per_task"]["A"]["pc_success"] == 50.0
    assert s["per_task"]["A"]["avg_sum_reward"] == -2.0 and s["aggregated"]["avg_sum_reward"] == -2.0
    assert [e["episode_ix"] for e in s["per_episode"]] == [0, 1, 2]


def test_scene_auxiliary_loss_is_training_only(dataset, tmp_path):
    policy = tiny_policy(dataset, vision="conv", scene_aux_dim=25, scene_aux_weight=0.5)
    batch = dataset.get(np.arange(4))
    assert batch["observation.environment_state"].shape == (4, 25)
    policy.train()
    loss, logs = policy(batch)
    assert logs["scene_loss"] > 0 and loss.item() == pytest.approx(
        logs["flow_loss"] + 0.5 * logs["scene_loss"], rel=1e-4
    )
    loss.backward()
    assert policy.model.scene_readout[0].weight.grad.abs().sum() > 0
    assert policy.model.vision.keypoint_logits.weight.grad.abs().sum() > 0
    policy.eval()
    without = {k: v for k, v in batch.items() if k != "observation.environment_state"}
    noise = torch.randn(4, 4, 4)
    actions = policy.predict_action_chunk(without, noise=noise)  # inference never reads it
    policy.save_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(from_pretrained(tmp_path / "ckpt").predict_action_chunk(without, noise=noise), actions)
    with pytest.raises(ValueError, match="environment_state"):
        policy.train()(without)


def test_training_seconds_add_up_every_segment_of_a_resumed_run(tmp_path):
    from policies.training import training_seconds

    lines = [{"step": 10, "elapsed_s": 4.0}, {"step": 20, "elapsed_s": 9.0}]  # the first segment
    lines += [{"step": 30, "elapsed_s": 3.0}, {"step": 40, "elapsed_s": 5.5}]  # resumed: the clock restarts
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 50, "elaps'  # a line cut short by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    assert training_seconds(tmp_path / "metrics.jsonl") == 14.5
