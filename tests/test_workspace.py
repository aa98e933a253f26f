"""The workspace's write helpers: a reader sees the old folder or the new one, never a half-written one."""

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
