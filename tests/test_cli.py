"""The `vlmrec` command's own options (issue 19): --version, --log-level, --log-format (JSON lines on stderr
for a cluster's collector; results stay on stdout)."""

from __future__ import annotations

import json
import logging

import pytest

from vlmrec.cli import configure_logging, main, version


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"vlmrec {version()}"
    assert version() != "unknown"


def test_json_logs_one_object_per_line_with_levels_and_libraries_kept_quiet(capsys):
    configure_logging("INFO", "json")
    try:
        logging.getLogger("vlmrec.refresh").info("step %d", 3)
        logging.getLogger("feast.infra.registry").info("Registry cache expired")  # a library's chatter
        logging.getLogger("feast.infra.registry").warning("something worth seeing")
        logging.getLogger("serving.report").debug("not at INFO")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(e["level"], e["logger"], e["message"]) for e in lines] == [
            ("INFO", "vlmrec.refresh", "step 3"),
            ("WARNING", "feast.infra.registry", "something worth seeing"),
        ]
        assert all("time" in e for e in lines)
    finally:
        configure_logging("WARNING", "text")


def test_a_bad_log_level_is_a_cli_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--log-level", "LOUD", "refresh", "--help"])
    assert done.value.code == 2 and "--log-level" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--window", "--batch-size", "--num-actors"])
def test_embed_sizes_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as done:
        main(["embed", "--workdir", "nowhere", flag, "0"])
    assert done.value.code == 2 and flag in capsys.readouterr().err


def test_embed_in_process_max_items_takes_zero_but_not_less(capsys):
    from teacher.embed import config_from_args
    from vlmrec.cli import build_parser

    args = build_parser("embed").parse_args(["embed", "--in-process-max-items", "0"])
    assert config_from_args(args).in_process_max_items == 0
    with pytest.raises(SystemExit) as done:
        main(["embed", "--workdir", "nowhere", "--in-process-max-items", "-1"])
    assert done.value.code == 2 and "--in-process-max-items" in capsys.readouterr().err


def test_index_build_takes_the_versions_settings_but_not_the_searchers(capsys):
    """Whether a copy is scanned exactly is the Producer's setting (`vlmrec serve --scan-max-points`), not a
    version's: `vlmrec index build` does not offer it, and its config keeps IndexConfig's default."""
    from index.cli import config_from_args
    from index.config import IndexConfig
    from vlmrec.cli import build_parser

    args = build_parser("index").parse_args(["index", "build", "--hnsw-m", "16", "--workdir", "w"])
    assert config_from_args(args) == IndexConfig(hnsw_m=16)
    with pytest.raises(SystemExit):
        build_parser("index").parse_args(["index", "build", "--scan-max-points", "0"])
    assert "--scan-max-points" in capsys.readouterr().err
