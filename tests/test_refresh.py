"""Issue 18's loop end to end on sample data: serve two arms, replay traffic the workspace has never seen,
`vlmrec refresh` folds it in, retrains, gates and swaps in a new version while a client keeps asking; no
request fails, every answer is one exposure, every replayed event is tied to its exposure, and the report
shows both arms with a passing sample-ratio test. Plus the gate's rule and the warm start."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from serving.config import ProducerConfig
from tests.producer_world import free_port
from vlmrec.cli import main as vlmrec
from vlmrec.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ARMS = {"student": 0.5, "similar": 0.5}
TRAIN = ["--epochs", "3", "--patience", "3", "--max-len", "8", "--batch-size", "16", "--d-model", "16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local) -> tuple[Workspace, Path]:
    """The sample's first 80% of events ingested, embedded, materialized, a student trained and indexed,
    the teacher indexed (`similar`); the last 20% kept aside as tomorrow's traffic."""
    from teacher.embed import EmbedConfig, embed_catalogue
    from vlmrec.sample import SampleConfig, generate_sample

    root = tmp_path_factory.mktemp("refresh")
    paths = generate_sample(root / "raw", SampleConfig(seed=5, n_users=40, n_items=60, mean_events=12))
    events = pd.read_csv(paths.events).sort_values("event_timestamp", kind="stable")
    cut = int(0.8 * len(events))
    events.iloc[:cut].to_csv(root / "before.csv", index=False)
    after = events.iloc[cut:][["user_id", "item_id"]].reset_index(drop=True)
    after["event_timestamp"] = pd.Timestamp("2030-01-01", tz="UTC")  # order only: the replay posts at now
    after.to_parquet(root / "after.parquet")
    ws = Workspace(root / "ws")
    d = str(ws.root)
    assert vlmrec(["ingest", "--events", str(root / "before.csv"), "--catalogue", str(paths.catalogue),
                   "--workdir", d, "--max-len", "8"]) == 0  # fmt: skip
    embed_catalogue(ws, EmbedConfig(batch_size=16))  # in this process: a small catalogue
    assert vlmrec(["features", "--workdir", d]) == 0
    assert vlmrec(["train", "--workdir", d, "--name", "student", *TRAIN]) == 0
    assert vlmrec(["index", "build", "--workdir", d, "--run", "student"]) == 0
    assert vlmrec(["index", "build", "--workdir", d, "--teacher"]) == 0
    return ws, root / "after.parquet"


def test_refresh_swaps_a_new_version_in_under_live_traffic_and_the_loop_reports_both_arms(world):
    from serving.cli import start, stop
    from serving.exposures import read_exposures
    from serving.parquet_log import read_log
    from serving.replay import ReplayConfig, replay
    from serving.report import ReportConfig, report
    from vlmrec.refresh import RefreshConfig, refresh
    from vlmrec.schema import EVENTS_LOG

    ws, after = world
    experiment = {"name": "loop", "arms": [{"name": a, "producer": a, "share": s} for a, s in ARMS.items()]}
    config = ProducerConfig(
        workdir=str(ws.root), index_dir=str(ws.named_index("student")), experiment=experiment, log_flush_s=0.2
    )
    url = start(config, port=free_port())
    answered, failures, versions = [], [], []
    stop_loop = threading.Event()

    def client() -> None:  # a caller that keeps asking throughout the swap
        users = np.random.default_rng(0).integers(1, 41, size=100_000)
        with httpx.Client(base_url=url, timeout=30) as http:
            for user in users:
                if stop_loop.is_set():
                    return
                r = http.post("/v1/candidates", json={"user_id": int(user), "k": 10})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:200]))
                    continue
                body = r.json()
                answered.append(body["request_id"])
                if body["arm"] == "student":
                    versions.append(body["model_version"])

    try:
        n_replay = int(pd.read_parquet(after).shape[0])
        replayed = replay(
            ReplayConfig(workdir=str(ws.root), url=url, k=10, max_events=n_replay, events=str(after))
        )
        assert replayed["outcomes"] == {"events_ok": n_replay}, replayed
        assert set(replayed["arms"]) == set(ARMS)
        deadline = time.monotonic() + 20  # the event log's writer flushes on its own clock
        while len(read_log(str(ws.events_log), EVENTS_LOG)) < n_replay and time.monotonic() < deadline:
            time.sleep(0.2)
        loop = threading.Thread(target=client, daemon=True)
        loop.start()
        out = refresh(
            RefreshConfig(workdir=str(ws.root), name="student-r1", margin=1.0, min_queries=20, epochs=2)
        )
        time.sleep(1.0)  # a few more answers from the new version
        stop_loop.set()
        loop.join(timeout=60)

        assert out["decision"].startswith("promoted"), out
        assert out["folded"]["events_added"] == n_replay, out["folded"]
        assert out["window_queries"] + out["window_skipped_no_history"] == n_replay  # the replayed traffic
        assert out["trained"]["warm_start"]["items_matched"] > 0
        assert not failures, failures[:5]  # no failed request during the swap
        assert versions[0].startswith("student@") and versions[-1].startswith("student-r1@")
        assert (ws.root / "refresh" / "student-r1.json").exists()
        assert ws.serve_config.exists() and "student-r1" in ws.serve_config.read_text()

        # one exposure per answered request: the replay's and the client's (the writer flushes on its clock)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            logged = read_exposures(str(ws.exposures)).column("request_id").to_pylist()
            if len(logged) >= replayed["replayed"] + len(answered):
                break
            time.sleep(0.2)
        assert len(logged) == len(set(logged)) == replayed["replayed"] + len(answered)
        assert set(answered) <= set(logged)
        r = report(ReportConfig(str(ws.root), k=10, shares=tuple(ARMS.items()), bootstrap=50))
        assert r["events_tied_to_an_exposure"] == n_replay  # every replayed event links to its exposure
        assert set(r["arms"]) == set(ARMS) and not r["srm_flag"] and r["srm_p"] > 1e-3, r["srm"]
    finally:
        stop_loop.set()
        stop()


def test_the_gate_keeps_the_serving_version_when_the_new_one_is_worse():
    from vlmrec.refresh import decide

    assert decide(0.100, 0.099, margin=0.02)[0]  # within the margin
    assert not decide(0.100, 0.097, margin=0.02)[0]
    assert decide(0.0, 0.0, margin=0.0)[0]  # nothing to lose
    assert decide(0.1, 0.0, margin=1.0)[0]  # margin 1: anything that loads


def test_warm_start_copies_shared_weights_and_maps_item_rows_by_id():
    from training.config import ModelConfig
    from training.model import SeqRec, warm_start

    cfg = ModelConfig(n_items=4, teacher_dim=0, item_space="id", d_model=8, max_len=6)
    old = SeqRec(cfg, item_ids=np.array([-1, 10, 11, 12, 13]))
    torch.manual_seed(1)
    new = SeqRec(ModelConfig(**{**cfg.to_dict(), "n_items": 3}), item_ids=np.array([-1, 12, 99, 10]))
    fresh_row = new.id_emb.weight[2].clone()
    info = warm_start(new, old)
    assert info["items_matched"] == 2 and not info["skipped"]
    assert torch.equal(new.id_emb.weight[1], old.id_emb.weight[3])  # item 12
    assert torch.equal(new.id_emb.weight[3], old.id_emb.weight[1])  # item 10
    assert torch.equal(new.id_emb.weight[2], fresh_row)  # item 99: nobody knew it
    name = next(n for n, _ in old.named_parameters() if n not in ("id_emb.weight",))
    assert torch.equal(dict(new.named_parameters())[name], dict(old.named_parameters())[name])


def test_a_rayservice_swap_patches_only_the_producers_user_config_guarded_by_its_version():
    """`--swap rayservice/<name>`: GET the RayService, PATCH serveConfigV2 with the new user_config and the
    resourceVersion it read (a fake Kubernetes API here: a 409 when the version moved on)."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import yaml

    from serving.rollout import RAYSERVICES, RayServiceTarget

    serve_config = {
        "http_options": {"port": 8000},
        "applications": [{"name": "vlmrec-producer", "import_path": "serving.producer:app",
                          "deployments": [{"name": "Producer", "num_replicas": 2,
                                           "user_config": {"workdir": "/workspace", "run": "student"}}]}],
    }  # fmt: skip
    state = {"version": "7", "spec": {"serveConfigV2": yaml.safe_dump(serve_config)}, "patches": []}
    path = RAYSERVICES.format(namespace="ns", name="vlmrec-producer")

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            assert self.path == path and self.headers["Authorization"] == "Bearer t0ken"
            self.reply(200, {"metadata": {"resourceVersion": state["version"]}, "spec": state["spec"]})

        def do_PATCH(self):
            assert self.headers["Content-Type"] == "application/merge-patch+json"
            patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["patches"].append(patch)
            if patch["metadata"]["resourceVersion"] != state["version"]:
                return self.reply(409, {"reason": "Conflict"})
            state["spec"] |= patch["spec"]
            state["version"] = str(int(state["version"]) + 1)
            self.reply(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}"
        target = RayServiceTarget("vlmrec-producer", "ns", api, "t0ken", None, "http://vlmrec-producer:8000")
        current = target.user_config()
        assert current == {"workdir": "/workspace", "run": "student"}
        target.apply({**current, "run": "student-2", "index_alias": "items_student-2"})
        applied = yaml.safe_load(state["spec"]["serveConfigV2"])
        (deployment,) = applied["applications"][0]["deployments"]
        assert deployment["user_config"]["run"] == "student-2" and deployment["num_replicas"] == 2
        assert applied["http_options"] == serve_config["http_options"]  # nothing else changed
        assert state["patches"][0]["metadata"] == {"resourceVersion": "7"}

        stale = RayServiceTarget("vlmrec-producer", "ns", api, "t0ken", None, "")
        stale._read = lambda: (serve_config, "7")  # read before someone else's change
        with pytest.raises(RuntimeError, match="HTTP 409"):
            stale.apply(current)
    finally:
        server.shutdown()
