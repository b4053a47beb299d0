"""Files are written whole or not at all (policies.io), benchmark sections share one command
line (policies.benchmark), and env ids have one spelling (envs.ids)."""

import json

import pytest

import envs
from envs.ids import is_metaworld, is_tabletop, metaworld_id, tabletop_id, task_env_id, task_name
from policies.benchmark import rows_markdown, section_main
from policies.io import atomic_directory, atomic_file, read_json, replace_between_markers, write_json, write_text


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_an_interrupted_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "results.md", "old\n")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and _leftovers(tmp_path) == []
    write_json(tmp_path / "deep" / "r.json", {"a": [1, 2]})  # parents are made
    assert read_json(tmp_path / "deep" / "r.json") == {"a": [1, 2]} and read_json(tmp_path / "none.json") is None


def test_a_temporary_file_keeps_the_destination_suffix_for_format_detection(tmp_path):
    with atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".plot.tmp")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_an_interrupted_directory_write_keeps_the_old_directory(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        raise RuntimeError("killed")
    assert (final / "config.json").read_text() == "{}" and _leftovers(tmp_path) == []
    with atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"] and _leftovers(tmp_path) == []


def test_a_marked_block_is_replaced_and_a_file_without_markers_is_left_alone(tmp_path):
    doc = write_text(tmp_path / "doc.md", "intro\n<!-- t:start -->\nold\n<!-- t:end -->\noutro\n")
    replace_between_markers(doc, "<!-- t:start -->", "<!-- t:end -->", "new table")
    assert doc.read_text() == "intro\n<!-- t:start -->\nnew table\n<!-- t:end -->\noutro\n"
    plain = write_text(tmp_path / "plain.md", "no markers\n")
    with pytest.raises(ValueError, match="needs one '<!-- t:start -->' line followed by one"):
        replace_between_markers(plain, "<!-- t:start -->", "<!-- t:end -->", "x")
    assert plain.read_text() == "no markers\n"


def test_a_benchmark_section_prints_its_rows_and_writes_them_as_json(tmp_path, capsys):
    calls = []

    def run(repeats, quick):
        calls.append((repeats, quick))
        return [{"benchmark": "b", "case": "c", "metric": "m", "value": 1234.5, "unit": "x"}]

    assert section_main(run, "doc", ["--repeats", "2", "--quick", "--json", str(tmp_path / "rows.json")]) == 0
    assert calls == [(2, True)]
    assert json.loads((tmp_path / "rows.json").read_text())[0]["value"] == 1234.5
    assert "| b | c | m | 1,234 | x |" in capsys.readouterr().out
    assert rows_markdown([{"benchmark": "b", "case": "c", "metric": "m", "value": 0.5, "unit": "s"}]).endswith(
        "| 0.5 | s |"
    )
    with pytest.raises(SystemExit):
        section_main(run, "doc", ["--repeats", "0"])


def test_every_env_id_and_task_name_round_trip():
    for task in envs.TASK_LIST:
        assert task.env_id == tabletop_id(task.name) and task_name(task.env_id) == task.name
        assert is_tabletop(task.env_id) and not is_metaworld(task.env_id) and task_env_id(task.name) == task.env_id
    for env_id in envs.suite("mt10"):
        assert is_metaworld(env_id) and metaworld_id(task_name(env_id)) == env_id
    assert task_env_id("adamoe/MetaWorld-reach-v3") == "adamoe/MetaWorld-reach-v3"
    assert tabletop_id("PickRed") == "adamoe/Tabletop-PickRed-v0" and task_name("HalfCheetah-v5") == "HalfCheetah-v5"
