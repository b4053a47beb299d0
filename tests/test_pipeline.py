"""The main job (policies.vla.pipeline, behind scripts/demo.py): pretrain, upcycle, fine-tune,
evaluate, report, in --quick mode."""

import json
import time

import numpy as np
import pytest

from policies import from_pretrained
from policies.vla import families, pipeline
from policies.vla.report import aggregate_seeds, seeds_markdown
from tests.conftest import ROOT, run_script

VARIANTS = ("vanilla", "adamoe")
TASKS = ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PickBlue-v0"]  # --quick's base suite
NEW = {"PlaceRedOnYellowPadThenStackGreenOnRed", "StackGreenOnBlue"}  # --quick's fine-tuning tasks


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_quick")
    argv = ["--quick", "--output-dir", str(out)]
    start = time.perf_counter()
    pipeline.run(pipeline.parse_args(argv))
    return out, argv, time.perf_counter() - start


def test_quick_run_writes_the_three_way_table_and_every_plot(quick_run):
    out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    assert list(rows) == ["dense", "vanilla", "adamoe"]  # --quick skips evaluating the pretrained policy
    for row in rows.values():
        for split in ("train", "heldout"):  # the new tasks, on both phrasing splits
            assert 0.0 <= row[f"success_{split}"] <= 1.0
            assert set(row[f"per_task_{split}"]) == NEW
        # Retention: the base suite the policy was pretrained on, on its training phrasings.
        assert set(row["per_task_retention"]) == {"ReachRed", "PickBlue"}
        assert {task: n for task, (_, n) in row["counts_retention"].items()} == {"ReachRed": 1, "PickBlue": 1}
        # The long task's per-stage progress: the share of episodes past each of its two stages.
        stages = row["stages_train"]["PlaceRedOnYellowPadThenStackGreenOnRed"]
        assert len(stages) == 2 and 0.0 <= stages[1] <= stages[0] <= 1.0
        # The curve: one earlier point (step 5 of 10) and the final evaluation.
        assert [p["step"] for p in row["curve"]] == [5, 10]
        assert row["curve"][-1]["success"] == row["success_train"]
        assert row["latency_ms"] > 0
    # Four routed copies of each FFN, one of them active per token; the dense rows are smaller.
    for moe in ("vanilla", "adamoe"):
        assert rows[moe]["params_total"] > rows[moe]["params_active"] > rows["dense"]["params_total"]
        assert rows[moe]["init"] == "paper"
    table = (out / "results.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    assert "retention: base suite" in table and "Stages completed" in table
    plots = ("success_per_task", "training_curves", "finetuning_curves", "stage_progress")
    for plot in (*plots, "expert_use_vanilla", "expert_use_adamoe"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    for name in ("dense", "vanilla", "adamoe"):
        for split in ("", "heldout", "retention"):
            assert (out / "eval" / name / split / "eval_info.json").is_file()


def test_expert_use_is_a_distribution_over_experts_per_task_and_layer(quick_run):
    out, _, _ = quick_run
    use = json.loads((out / "results.json").read_text())["expert_use"]
    assert set(use) == {"vanilla", "adamoe"}
    for variant in use.values():
        # The new tasks first, then the base suite's (from its reference demonstrations).
        assert variant["tasks"] == [
            "PlaceRedOnYellowPadThenStackGreenOnRed",
            "StackGreenOnBlue",
            "ReachRed",
            "PickBlue",
        ]
        for layer, distances in variant["separation"].items():
            assert layer in variant["layers"] and set(distances) == {"within_new", "within_old", "across"}
            assert all(0.0 <= d <= 1.0 for d in distances.values())
        assert len(variant["layers"]) == 2  # the tiny preset's action expert has two FFNs
        for task in variant["tasks"]:
            for layer in variant["layers"]:
                share = np.array(variant["share"][task][layer])
                assert share.shape == (4,) and share.min() >= 0 and share.sum() == pytest.approx(1.0)


def test_checkpoints_reload_as_the_variant_they_are(quick_run):
    out, _, _ = quick_run
    assert from_pretrained(out / "checkpoints" / "dense").config.moe is None
    routers = {v: from_pretrained(out / "checkpoints" / v).config.moe["config"]["router"] for v in VARIANTS}
    assert routers == {"vanilla": "topk", "adamoe": "adamoe"}


def test_a_second_run_of_the_demo_command_reuses_every_finished_stage(quick_run):
    out, argv, first = quick_run
    finished = [
        *(out / "checkpoints").glob("*/model.safetensors"),
        *(out / "eval").rglob("eval_info.json"),
    ]
    before = {p: p.stat().st_mtime_ns for p in finished}
    start = time.perf_counter()
    proc = run_script("demo.py", *argv)
    assert {p: p.stat().st_mtime_ns for p in finished} == before  # nothing trained or evaluated again
    assert time.perf_counter() - start < first
    assert "| adamoe | paper |" in proc.stdout and "reusing it" in proc.stdout


def test_a_rerun_with_other_settings_retrains_and_reevaluates_and_says_why(quick_run, tmp_path, capsys):
    import shutil

    out, argv, _ = quick_run
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    argv = [*argv[: argv.index("--output-dir")], "--output-dir", str(copy), *argv[argv.index("--output-dir") + 2 :]]
    weights = copy / "checkpoints" / "adamoe" / "model.safetensors"
    evaluation = copy / "eval" / "adamoe" / "eval_info.json"
    before = (weights.read_bytes(), evaluation.stat().st_mtime_ns)
    steps = pipeline.parse_args(argv).finetune_steps
    pipeline.run(pipeline.parse_args([*argv, "--finetune-steps", str(steps + 2), "--variants", "adamoe"]))
    said = capsys.readouterr().out
    assert "train adamoe: settings changed since" in said and "evaluate adamoe (train): settings changed" in said
    assert weights.read_bytes() != before[0] and evaluation.stat().st_mtime_ns != before[1]
    record = json.loads((copy / "runs" / "adamoe" / "stage.json").read_text())
    assert record["settings"]["train"]["steps"] == steps + 2


def test_datasets_are_reused_only_when_collected_with_this_runs_noise_and_episode_count(quick_run):
    from dataclasses import replace

    from envs.collection import CollectionJob, check_reusable, dataset_id_for

    done, _, _ = quick_run
    cfg = replace(pipeline.PipelineConfig(), datasets_root=str(done / "pretrain" / "datasets"), noise=[0.0])
    pipeline.collect(replace(cfg, episodes_per_task=2), TASKS)  # what the quick run collected: reused
    with pytest.raises(ValueError, match=r"holds 2 episodes per noise level, this run asks for --episodes-per-task 5"):
        pipeline.collect(replace(cfg, episodes_per_task=5), TASKS)
    with pytest.raises(ValueError, match=r"holds noise levels \[0.0\], this run asks for \[0.0, 0.1\]"):
        pipeline.collect(replace(cfg, episodes_per_task=2, noise=[0.0, 0.1]), TASKS)
    pipeline.collect(replace(cfg, episodes_per_task=2, seed=5), TASKS)  # seeds share one collection
    with pytest.raises(ValueError, match=r"collected with other settings \(image_size 64 there, 32 asked\)"):
        job = CollectionJob(episodes_per_task=2, noise_levels=(0.0,), image_size=32)
        check_reusable(dataset_id_for(TASKS[0]), cfg.root, 2, [0.0], job, TASKS[0])


def test_families_fine_tunes_each_family_and_writes_its_table_into_its_doc(quick_run, tmp_path):
    doc = tmp_path / "families.md"
    doc.write_text("intro\n<!-- families:start -->\nold table\n<!-- families:end -->\noutro\n")
    done, _, _ = quick_run
    out = tmp_path / "families"
    argv = ["--quick", "--output-dir", str(out), "--suite", *TASKS]
    argv += ["--datasets-root", str(done / "pretrain" / "datasets")]
    argv += ["--pretrained", str(done / "pretrain" / "policy" / "checkpoint"), "--variants", "topany", "bam_kv"]
    run_script("families.py", *argv, "--update-docs", "--doc", doc)
    text = doc.read_text()
    assert text.startswith("intro\n<!-- families:start -->\n`python scripts/families.py --quick --output-dir")
    assert text.endswith("<!-- families:end -->\noutro\n") and "old table" not in text
    assert "| topany | paper |" in text and "| bam_kv | paper |" in text and "| ReachRed |" in text
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["variants"]}
    # Top-any: the measured experts per token (between 1 and all 4) set its active parameters.
    base = done / "pretrain" / "policy" / "checkpoint"
    policy = pipeline.upcycled(pipeline.parse_args(argv), base, "topany")
    per_expert = sum(p.numel() for p in policy.model.action_expert.layers[0].mlp.experts.parameters()) // 4
    depth = policy.config.depth
    assert rows["topany"]["params_total"] - 3 * depth * per_expert < rows["topany"]["params_active"]
    assert rows["topany"]["params_active"] < rows["topany"]["params_total"]
    # BAM: soft attention experts all run; one routed FFN expert of four.
    bam = from_pretrained(out / "checkpoints" / "bam_kv")
    assert bam.config.attention_moe["config"]["share_kv"] is True
    assert rows["bam_kv"]["params_active"] == rows["bam_kv"]["params_total"] - 3 * depth * per_expert
    plain = tmp_path / "plain.md"
    plain.write_text("a document without the markers\n")
    proc = run_script("families.py", *argv, "--update-docs", "--doc", plain, check=False)
    assert proc.returncode != 0 and "needs one '<!-- families:start -->' line" in proc.stderr
    assert plain.read_text() == "a document without the markers\n"


def test_bam_mixes_specialists_and_compares_with_dense_at_equal_steps(quick_run, tmp_path):
    done, _, _ = quick_run
    out = tmp_path / "bam"
    argv = ["--quick", "--output-dir", str(out), "--datasets-root", str(done / "pretrain" / "datasets")]
    argv += ["--pretrained", str(done / "pretrain" / "policy" / "checkpoint"), "--share-kv"]
    argv += ["--groups", "reach=ReachRed", "pick=PickBlue", "--specialist-steps", "3", "--finetune-steps", "2"]
    run_script("bam.py", *argv)
    rows = [r["variant"] for r in json.loads((out / "results.json").read_text())["variants"]]
    assert rows == ["dense_long", "specialist_reach", "specialist_pick", "bam_mixed"]
    steps = {v: json.loads((out / "runs" / v / "summary.json").read_text())["steps"] for v in rows}
    assert steps == {"dense_long": 2 * 3 + 2, "specialist_reach": 3, "specialist_pick": 3, "bam_mixed": 2}
    mixed = from_pretrained(out / "checkpoints" / "bam_mixed")
    assert mixed.config.moe["config"]["num_experts"] == 2 and mixed.config.attention_moe["config"]["share_kv"]
    # A rerun with more mixture steps reuses the specialists and retrains what the change touches.
    specialist = (out / "checkpoints" / "specialist_pick" / "model.safetensors").read_bytes()
    said = run_script("bam.py", *argv[:-1], "3").stdout
    assert "train specialist_pick: " in said and "reusing it" in said
    assert "train bam_mixed: settings changed since" in said and "train dense_long: settings changed since" in said
    steps = {v: json.loads((out / "runs" / v / "summary.json").read_text())["steps"] for v in rows}
    assert steps == {"dense_long": 2 * 3 + 3, "specialist_reach": 3, "specialist_pick": 3, "bam_mixed": 3}
    assert (out / "checkpoints" / "specialist_pick" / "model.safetensors").read_bytes() == specialist
    # An output made before settings were recorded is made again, and the run says why.
    (out / "runs" / "specialist_pick" / "stage.json").unlink()
    said = run_script("bam.py", *argv[:-1], "3").stdout
    assert "train specialist_pick: " in said and "holds no record of the settings it was made with" in said
    proc = run_script("bam.py", *argv[:7], "--groups", "reach=ReachPurple", "pick=PickBlue", check=False)
    assert proc.returncode != 0 and "unknown tabletop task 'ReachPurple'" in proc.stderr


def test_variant_names_are_checked_against_the_known_kinds():
    assert families.parse_variant("adamoe", "paper") == ("adamoe", "paper")
    assert families.parse_variant("vanilla-preserve", "paper") == ("vanilla", "preserve")
    assert families.parse_variant("dense", "preserve") == ("dense", None)
    with pytest.raises(
        ValueError, match=r"variant 'moe': the kind must be one of \('dense', 'vanilla', 'adamoe', 'switch'"
    ):
        families.parse_variant("moe", "paper")
    with pytest.raises(ValueError, match="init 'warm' is not one of"):
        families.parse_variant("adamoe-warm", "paper")
    proc = run_script("demo.py", "--quick", "--variants", "dense-paper", check=False)
    assert proc.returncode != 0 and "error: variant 'dense-paper'" in proc.stderr


def _episodes(successes: list[int], task: str = "T") -> list[dict]:
    return [{"task": task, "seed": 100_000 + i, "success": bool(s)} for i, s in enumerate(successes)]


def test_experiment_pools_seeds_and_pairs_each_variant_with_dense_on_the_same_scenes():
    rng = np.random.default_rng(0)
    dense = {s: rng.random(50) < 0.5 for s in range(3)}
    episodes = {
        s: {
            "dense": {"train": _episodes(dense[s])},
            # succeeds wherever dense does and on a third of the rest: better on the same scenes
            "thor": {"train": _episodes(dense[s] | (np.arange(50) % 3 == 0))},
            "twin": {"train": _episodes(dense[s])},  # the same outcomes as dense
        }
        for s in range(3)
    }
    for s in range(3):  # retention: the base solves every old scene; thor forgets a fifth of them
        episodes[s]["pretrained"] = {"retention": _episodes([1] * 40, task="Old")}
        episodes[s]["thor"]["retention"] = _episodes(np.arange(40) % 5 != 0, task="Old")
    rows = {r["variant"]: r for r in aggregate_seeds(episodes, ["dense", "thor", "twin"], resamples=2000)}
    pooled = np.concatenate([dense[s] for s in range(3)]).mean()
    assert rows["dense"]["success_train"]["mean"] == pytest.approx(pooled)
    assert rows["dense"]["success_train"]["episodes"] == 150
    assert rows["dense"]["success_train"]["low"] < pooled < rows["dense"]["success_train"]["high"]
    gain = rows["thor"]["vs_dense"]["train"]
    assert gain["mean"] > 0 and gain["low"] > 0 and gain["significant"]
    assert gain["mean"] == pytest.approx(rows["thor"]["success_train"]["mean"] - pooled)
    same = rows["twin"]["vs_dense"]["train"]
    assert same["mean"] == same["low"] == same["high"] == 0.0 and not same["significant"]
    assert "vs_dense" not in rows["dense"]
    forgot = rows["thor"]["vs_pretrained_retention"]
    assert forgot["mean"] == pytest.approx(-0.2) and forgot["high"] < 0 and forgot["significant"]
    assert "vs_pretrained_retention" not in rows["twin"] and rows["pretrained"]["success_retention"]["mean"] == 1.0
    facts = {v: {"params_total": 2e6, "params_active": 1e6, "latency_ms": 9.0} for v in ("dense", "thor", "twin")}
    table = seeds_markdown(list(rows.values()), [0, 1, 2], facts)
    assert f"| thor | **{100 * gain['mean']:+.1f} [" in table and "| twin | +0.0 [+0.0, +0.0] | - |" in table
    assert "| thor | **-20.0 [" in table
    # Episodes that are not on the same scenes are refused, not silently compared.
    episodes[0]["thor"]["train"] = _episodes(dense[0][:49])
    with pytest.raises(ValueError, match="not paired: 49 episodes against 50"):
        aggregate_seeds(episodes, ["dense", "thor"], resamples=10)


def test_demo_refuses_model_options_that_the_shipped_base_would_ignore():
    cfg = pipeline.parse_args(["--set", "depth=2"])
    with pytest.raises(ValueError, match="add --pretrain"):
        cfg.validate()
    cfg = pipeline.parse_args(["--pretrained", str(ROOT / "checkpoints" / "vla-tabletop-base"), "--suite", "mt10"])
    with pytest.raises(ValueError, match="Meta-World needs --pretrained"):
        cfg.validate()
