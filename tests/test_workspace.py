"""The workspace: its write helpers (a reader sees the old folder or the new one, never a half-written one)
and its names (a run or an index is one folder of it)."""

from __future__ import annotations

import pytest

from vlmrec.workspace import staged_dir


def test_staged_dir_swaps_in_the_new_folder_and_drops_the_old(tmp_path):
    final = tmp_path / "runs" / "a" / "export"
    with staged_dir(final) as tmp:
        (tmp / "run.json").write_text("1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "run.json").read_text() == "1"
    with staged_dir(final) as tmp:
        (tmp / "run.json").write_text("2")
        assert (final / "run.json").read_text() == "1"  # the old one serves while the new one is built
    assert (final / "run.json").read_text() == "2"
    assert sorted(p.name for p in final.parent.iterdir()) == ["export"]  # no temporary or old folder left


def test_a_failed_build_leaves_the_old_folder(tmp_path):
    final = tmp_path / "export"
    with staged_dir(final) as tmp:
        (tmp / "run.json").write_text("old")
    with pytest.raises(RuntimeError, match="merge check"), staged_dir(final) as tmp:
        (tmp / "run.json").write_text("half")
        raise RuntimeError("merge check failed")
    assert (final / "run.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_run_is_one_folder_and_a_missing_export_names_the_command_that_trains_it(tmp_path):
    from vlmrec.workspace import Workspace, check_name

    ws = Workspace(tmp_path)
    for bad in ("", "..", "../x", "a/b", ".hidden", "-flag", "a b"):
        with pytest.raises(ValueError, match="must be a folder name"):
            check_name(bad, "name")
    assert check_name("student-b_2.v1", "name") == "student-b_2.v1"
    with pytest.raises(ValueError, match="must be a folder name"):
        ws.named_index("../index")
    with pytest.raises(FileNotFoundError, match=f"run `vlmrec train --workdir {tmp_path} --name s`"):
        ws.export("s")
    (ws.runs / "s" / "export").mkdir(parents=True)
    (ws.runs / "s" / "export" / "run.json").write_text("{}")
    assert ws.export("s") == ws.runs / "s" / "export"
