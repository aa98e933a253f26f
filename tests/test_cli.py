"""The `vlmrec` command's own options (issue 19): --version, --log-level, --log-format (JSON lines on stderr
for a cluster's collector; results stay on stdout)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import free_port
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


def test_serve_names_what_is_missing_before_it_starts_anything(tmp_path, capsys, monkeypatch):
    """`vlmrec serve` on a workspace without the default producer's export or index, with a held or
    impossible port, or no replica: the CLI's error line naming the file (and the command that builds it) or
    the flag, before Ray or Serve starts, never a replica's failure in Serve's logs. A sibling producer's
    files may be missing (it is reported by /readyz, not refused)."""
    import socket

    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = ray.is_initialized()

    def error(*flags: str) -> str:
        assert main(["serve", "--workdir", str(tmp_path), *flags]) == 2
        return capsys.readouterr().err

    export = tmp_path / "runs" / "student" / "export"
    assert f"no student export at {export / 'run.json'}" in error()
    assert f"run `vlmrec train --workdir {tmp_path} --name student`" in error()
    assert "no sasrec export" in error("--producer", "sasrec")
    assert f"no events table at {tmp_path / 'data' / 'events.parquet'}" in error("--producer", "popular")
    export.mkdir(parents=True)
    (export / "run.json").write_text("{}")
    assert "no student model" in error()
    (export / "model").mkdir()
    (export / "model" / "config.json").write_text("{}")
    assert "no student model weights" in error()
    (export / "model" / "model.safetensors").write_bytes(b"")
    assert f"no student index at {tmp_path / 'index' / 'CURRENT'}: run `vlmrec index build" in error()
    assert "--replicas must be >= 1, got 0" in error("--replicas", "0")
    assert "--port must be in 1..65535, got 70000" in error("--port", "70000")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert f"--port: 127.0.0.1:{port} cannot be bound" in error("--port", str(port))
    assert ray.is_initialized() == started  # nothing was started


def test_serve_checks_the_files_of_the_producers_that_must_load_and_that_export_and_index_agree(tmp_path):
    """check_sources: the default producer's files and an experiment's arms', not a sibling's; the model
    loads (a truncated weights file is named); the export's run.json and model against the index's CURRENT
    (teacher, dimension, distance)."""
    import json

    import torch

    from serving.config import ProducerConfig
    from serving.loading import check_sources
    from training.config import ModelConfig
    from training.model import WEIGHTS_FILE, SeqRec

    export, index = tmp_path / "runs" / "student" / "export", tmp_path / "index"
    export.mkdir(parents=True)
    (export / "run.json").write_text(json.dumps({"teacher_id": "minilm:x"}))
    SeqRec(ModelConfig(n_items=5, teacher_dim=8), teacher=torch.randn(6, 8)).save_pretrained(export / "model")
    index.mkdir()
    version = {"version": "v1", "teacher_id": "minilm:x", "dim": 8, "count": 5, "created": "2026-12-04"}

    def check(**changes):
        (index / "CURRENT").write_text(json.dumps({**version, **changes}))
        check_sources(ProducerConfig(workdir=str(tmp_path)))

    check()  # student's files there and agreeing; sasrec's, similar's missing
    with pytest.raises(ValueError, match="teacher mismatch: the export .* holds 'siglip:y' vectors"):
        check(teacher_id="siglip:y")
    with pytest.raises(ValueError, match="dimension mismatch: model out_dim 8, index dim 16"):
        check(dim=16)
    with pytest.raises(
        ValueError, match="distance mismatch: the adapter-space export .* needs a cosine index"
    ):
        check(distance="dot")
    with pytest.raises(FileNotFoundError, match="no sasrec export"):
        check_sources(ProducerConfig(workdir=str(tmp_path), producer="sasrec"))
    check()  # agreeing again
    weights = export / "model" / WEIGHTS_FILE
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        ValueError,
        match=r"the model at .*model does not load \(SafetensorError: .*: run `vlmrec train --workdir",
    ):
        check()
    weights.write_bytes(whole)
    with pytest.raises(ValueError, match="no Qdrant server answers at http://127.0.0.1:9 "):
        check_sources(
            ProducerConfig(workdir=str(tmp_path), index_backend="server", index_url="http://127.0.0.1:9")
        )
    arms = [
        {"name": "control", "producer": "student", "share": 0.5},
        {"name": "b", "producer": "student", "run": "student-b", "share": 0.5},
    ]
    with pytest.raises(FileNotFoundError, match="no student export at .*student-b"):
        check_sources(ProducerConfig(workdir=str(tmp_path), experiment={"name": "ab", "arms": arms}))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--name", "../../etc"], "name must be a folder name"),
        (["--name", ""], "name must be a folder name"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--batch-size", "-1"], "batch_size must be >= 1, got -1"),
        (["--patience", "0"], "patience must be >= 1, got 0"),
        (["--lr", "0"], "lr must be > 0, got 0.0"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),  # NaN passes every comparison
        (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
        (["--fusion-weight", "nan"], "fusion_weight must be a finite number >= 0, got nan"),
        (["--grad-clip", "-1"], "grad_clip must be >= 0, got -1.0"),
        (["--d-model", "0"], "d_model must be >= 1, got 0"),
        (["--n-heads", "0"], "n_heads must be >= 1, got 0"),
        (["--n-blocks", "0"], "n_blocks must be >= 1, got 0"),
        (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
        (["--temperature", "0"], "temperature must be > 0, got 0.0"),
        (["--contrastive-weight", "-1"], "contrastive_weight must be >= 0, got -1.0"),
        (["--num-workers", "0"], "num_workers must be >= 1, got 0"),
        (["--popular-k", "0"], "popular_k must be >= 1, got 0"),
        (["--zero-config", "/nonexistent.json"], "zero_config: no DeepSpeed JSON at /nonexistent.json"),
    ],
)
def test_train_refuses_a_bad_setting_by_name_before_it_starts(flags, message, tmp_path, capsys):
    """A run name that is not one folder (it would write outside runs/) or a setting no training can take is
    the CLI's error line naming it, raised by the config in the driver: not a worker's traceback in Ray
    Train, not a hang."""
    assert main(["train", "--workdir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--n-items", "--teacher-dim"])
def test_train_offers_no_flag_for_what_the_data_sets(flag, tmp_path, capsys):
    """The vocabulary and the teacher's width come from the item table: a flag for them would be ignored."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--workdir", str(tmp_path), flag, "5"])
    assert exit_.value.code == 2 and f"unrecognized arguments: {flag} 5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tune", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["tune", "--logit-lr", "nan"], "logit_lr must be a finite number >= 0, got nan"),
        (["tune", "--lora-rank", "0"], "lora_rank must be >= 1, got 0"),
        (["tune", "--lora-dropout", "1"], "lora_dropout must be in [0, 1), got 1.0"),
        (["tune", "--window-s", "nan"], "window_s must be a finite number > 0, got nan"),
        (["tune", "--method", "lit", "--pairs", "image-title", "--lit-dropout", "1"],
         "dropout must be in [0, 1), got 1.0"),
        (["tune-mix", "--k", "0"], "k must be >= 1, got 0"),
        (["tune-mix", "--cold-floor", "2"], "cold_floor must be in [0, 1], got 2.0"),
        (["tune-mix", "--blend-alpha", "nan"], "blend_alpha must be in (0, 1], got nan"),
        (["tune-mix", "--popular-half-life-days", "inf"],
         "popular_half_life_days must be a finite number > 0, got inf"),
        (["evaluate", "--sampled-negatives", "0"], "sampled_negatives must be >= 1, got 0"),
        (["refresh", "--window-days", "nan"], "window_days must be a finite number > 0, got nan"),
        (["refresh", "--timeout-s", "-1"], "timeout_s must be > 0, got -1.0"),
        (["serve", "--mix-budget-ms", "nan"], "mix_budget_ms must be a finite number > 0, got nan"),
        (["index", "build", "--quantization-quantile", "1.5"], "quantization_quantile must be in [0.5, 1], got 1.5"),
        (["index", "build", "--oversampling", "nan"], "oversampling must be a finite number >= 1, got nan"),
        (["index", "build", "--full-scan-threshold-kb", "-1"], "full_scan_threshold_kb must be >= 0, got -1"),
        (["index", "build", "--alias", ""], "alias must be a non-empty Qdrant alias name"),
        # the demo: what its last stages would refuse minutes in, refused before its first
        (["demo", "--epochs", "0"], "--epochs: epochs must be >= 1, got 0"),
        (["demo", "--sasrec-epochs", "-1"], "--sasrec-epochs: epochs must be >= 1, got -1"),
        (["demo", "--users", "0"], "--users must be >= 1, got 0"),
        (["demo", "--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["demo", "--port", str(free_port()), "--ui", "--ui-port", "0"], "--ui-port must be in 1..65535, got 0"),
    ],
)  # fmt: skip
def test_a_setting_no_run_can_take_is_refused_by_name_before_anything_starts(argv, message, tmp_path, capsys):
    """What the configs hold of a stage's settings (a NaN or an infinity included: each passes `<` and
    `<=` checks) is the CLI's error line, before data loads or Ray starts: not a worker's traceback, a hang,
    or a silent result (tune-mix with --k 0 wrote a mix.json)."""
    assert main([*argv, "--workdir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["tune", "--name", "a/b"],
        ["evaluate", "--runs", "../x"],
        ["evaluate", "--name", "../x"],  # the report's folder under eval/
        ["tune-mix", "--student-run", "../x"],
        ["index", "build", "--run", "../x", "--vectors", "v.parquet"],
        ["serve", "--run", ".hidden"],
    ],
)
def test_a_run_or_index_name_is_one_folder_of_the_workspace(argv, tmp_path, capsys):
    assert main([*argv, "--workdir", str(tmp_path)]) == 2
    assert "must be a folder name" in capsys.readouterr().err


def test_replay_refuses_a_url_where_no_ready_producer_answers(tmp_path, capsys):
    """Before its first event: a port nobody listens on, a server that is not a ready Producer, a URL that
    is not one. Each is the CLI's error naming --url, not a summary of N failed calls with exit 0."""
    import http.server
    import threading

    def error(url: str) -> str:
        assert main(["replay", "--workdir", str(tmp_path), "--url", url, "--max-events", "3"]) == 2
        return capsys.readouterr().err

    assert "--url: no Producer answers at http://127.0.0.1:" in error(f"http://127.0.0.1:{free_port()}")
    assert "--url: no Producer answers at not-a-url" in error("not-a-url")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert "/readyz answers 501" in error(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_ui_refuses_an_impossible_or_held_port_before_it_starts_the_page(tmp_path, capsys):
    import socket

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "items.parquet").write_bytes(b"")  # only its presence is checked first
    assert main(["ui", "--workdir", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 1..65535, got 70000" in capsys.readouterr().err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["ui", "--workdir", str(tmp_path), "--port", str(port)]) == 2
        assert f"--port: 127.0.0.1:{port} cannot be bound" in capsys.readouterr().err


def test_index_names_a_missing_vectors_file_catalogue_or_run(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["index", *argv, "--workdir", str(tmp_path)]) == 2
        return capsys.readouterr().err

    assert "--vectors: no such file /nowhere.parquet" in error("upsert", "--vectors", "/nowhere.parquet")
    vectors = tmp_path / "v.parquet"
    vectors.write_bytes(b"")
    catalogue = tmp_path / "data" / "items.parquet"
    assert f"{catalogue} is missing: run `vlmrec ingest" in error("build", "--vectors", str(vectors))
    catalogue.parent.mkdir()
    catalogue.write_bytes(b"")
    export = tmp_path / "runs" / "nosuch" / "export"
    assert f"no export of run 'nosuch' at {export}" in error("build", "--run", "nosuch")
    assert "--items: no such file /x.parquet" in error(
        "upsert", "--vectors", str(vectors), "--items", "/x.parquet"
    )


def test_a_stage_names_the_missing_input_and_the_stage_that_writes_it_before_ray_starts(tmp_path, capsys):
    import ray

    started = ray.is_initialized()

    def error(*argv: str) -> str:
        assert main([*argv, "--workdir", str(tmp_path)]) == 2
        return capsys.readouterr().err

    data = tmp_path / "data"
    assert f"{data / 'items.parquet'} is missing: run `vlmrec ingest --workdir {tmp_path}`" in error("embed")
    assert f"{data / 'events.parquet'} is missing: run `vlmrec ingest" in error("train", "--name", "a")
    data.mkdir()
    (data / "events.parquet").write_bytes(b"")
    assert f"{data / 'item_embeddings.parquet'} is missing: run `vlmrec embed" in error(
        "train", "--name", "a"
    )
    assert ray.is_initialized() == started
