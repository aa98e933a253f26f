"""A workspace is a Feast repository the Feast CLI drives (issue 19): `vlmrec features` writes
feature_store.yaml, the definitions module and a .feastignore, applies and materializes; then Feast's own
`feast plan`, `feast apply` and `feast materialize-incremental` work there, and the online store they fill is
the one the Producer reads."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from vlmrec.cli import main as vlmrec
from vlmrec.features import online_sequences, open_store
from vlmrec.sample import SampleConfig, generate_sample
from vlmrec.workspace import Workspace

FEAST = [str(Path(sys.executable).with_name("feast"))]


def feast(ws: Workspace, *args: str) -> str:
    done = subprocess.run([*FEAST, "-c", str(ws.root), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tuple[Workspace, pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("feast")
    paths = generate_sample(root / "raw", SampleConfig(seed=11, n_users=12, n_items=20, mean_events=6))
    events = pd.read_csv(paths.events)
    ws = Workspace(root / "ws")
    args = ["--catalogue", str(paths.catalogue), "--workdir", str(ws.root), "--max-len", "8"]
    assert vlmrec(["ingest", "--events", str(paths.events), *args]) == 0
    assert vlmrec(["features", "--workdir", str(ws.root)]) == 0
    return ws, events, paths.catalogue


def test_the_workspace_is_a_feast_repository_that_feast_plan_and_apply_accept(ws):
    ws, _, _ = ws
    for name in ("feature_store.yaml", "feature_definitions.py", ".feastignore"):
        assert (ws.root / name).is_file(), name
    # a training run's folder holds Python that must never be imported as feature definitions
    # (DeepSpeed copies zero_to_fp32.py into checkpoints): .feastignore keeps every sub-folder out
    poison = ws.runs / "student" / "ray" / "checkpoint_0" / "zero_to_fp32.py"
    poison.parent.mkdir(parents=True)
    poison.write_text("raise SystemExit('feast imported a checkpoint script')\n")
    plan = feast(ws, "plan")
    assert "user_click_sequence" in plan or "No changes" in plan or "no changes" in plan.lower()
    feast(ws, "apply")
    views = feast(ws, "feature-views", "list")
    assert {"user_click_sequence", "item_metadata", "item_embedding"} <= set(views.split())
    services = feast(ws, "feature-services", "list")
    assert "student_v1" in services


def test_feast_materialize_incremental_moves_new_clicks_into_the_store_the_producer_reads(ws):
    ws, events, catalogue = ws
    user = int(events["user_id"].iloc[0])
    before = online_sequences(open_store(ws), [user])[user]
    assert before  # `vlmrec features` materialized the sources' history on its first run
    # a later click of that user arrives through a new ingest (sources rewritten with one more row)
    # (stamped now: an incremental materialization takes rows after the last one's end, i.e. new traffic)
    new_item = int(events.loc[events["item_id"] != before[-1], "item_id"].iloc[0])
    later = pd.DataFrame({"user_id": [user], "item_id": [new_item],
                          "event_timestamp": [datetime.now(UTC).isoformat()]})  # fmt: skip
    grown = pd.concat([events[["user_id", "item_id", "event_timestamp"]], later], ignore_index=True)
    grown.to_csv(ws.root / "grown.csv", index=False)
    args = ["--catalogue", str(catalogue), "--workdir", str(ws.root), "--max-len", "8"]
    assert vlmrec(["ingest", "--events", str(ws.root / "grown.csv"), *args]) == 0
    assert online_sequences(open_store(ws), [user])[user] == before  # not materialized yet
    # the views with data (nothing is embedded in this workspace; k8s's CronJob runs it after `vlmrec embed`)
    end = (datetime.now(UTC) + timedelta(minutes=1)).isoformat(timespec="seconds")
    feast(ws, "materialize-incremental", "-v", "user_click_sequence", "-v", "item_metadata", end)
    after = online_sequences(open_store(ws), [user])[user]
    assert after == ([*before, new_item])[-8:]


def test_the_sql_registry_on_a_real_postgresql_serves_apply_the_cli_and_a_second_reader(
    tmp_path, postgres_url, monkeypatch
):
    """Issue 19: `vlmrec features --registry sql` keeps the registry in PostgreSQL (FEAST_REGISTRY_URL; no
    registry.db in the workspace): Feast's tables hold the definitions, the Feast CLI reads them, and a
    second process's FeatureStore (a Producer replica) reads the online store through them."""
    import psycopg

    paths = generate_sample(tmp_path / "raw", SampleConfig(seed=12, n_users=10, n_items=15, mean_events=5))
    ws = Workspace(tmp_path / "ws")
    args = ["--catalogue", str(paths.catalogue), "--workdir", str(ws.root), "--max-len", "8"]
    assert vlmrec(["ingest", "--events", str(paths.events), *args]) == 0
    monkeypatch.delenv("FEAST_REGISTRY_URL", raising=False)
    assert vlmrec(["features", "--workdir", str(ws.root), "--registry", "sql"]) == 2  # names what is missing
    monkeypatch.setenv("FEAST_REGISTRY_URL", postgres_url)
    assert vlmrec(["features", "--workdir", str(ws.root), "--registry", "sql"]) == 0
    assert "${FEAST_REGISTRY_URL}" in ws.feature_store_yaml.read_text()  # the URL (a secret) is not written
    assert not (ws.root / "registry.db").exists()
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
        views = {r[0] for r in conn.execute("SELECT feature_view_name FROM feature_views")}
        services = {r[0] for r in conn.execute("SELECT feature_service_name FROM feature_services")}
    assert {"user_click_sequence", "item_metadata"} <= views and "student_v1" in services
    assert "user_click_sequence" in feast(ws, "feature-views", "list")  # the CLI, through the same registry
    events = pd.read_csv(paths.events)
    users = sorted(int(u) for u in events["user_id"].unique())[:5]
    reader = subprocess.run(  # another process, as a replica would: the registry comes from PostgreSQL
        [sys.executable, "-c", "import json, sys; from vlmrec.features import online_sequences, open_store; "
         "from vlmrec.workspace import Workspace; "
         f"print(json.dumps(online_sequences(open_store(Workspace({str(ws.root)!r})), {users})))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert reader.returncode == 0, reader.stderr[-2000:]
    import json

    seen = {int(k): v for k, v in json.loads(reader.stdout.strip().splitlines()[-1]).items()}
    for u in users:
        assert seen[u] == events[events.user_id == u]["item_id"].tolist()[-8:]
