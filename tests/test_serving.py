"""serving/: the Producer and its sibling producers and Mixer on a tiny world (tests/producer_world.py:
Feast sqlite store, random student and id-space SeqRec exports, Edge indexes, events).

Ray Serve runs twice in this module, both module-scoped: a real `serve.run` over HTTP on 127.0.0.1 (a free
port), and local testing mode (in-process, so dependencies can be broken with monkeypatch).

Order matters, once: in Ray 2.60 a local-mode replica leaves a reference to itself (BackPressureError and
DeploymentUnavailableError handler closures) on the FastAPI app the ingress froze into the class, and the
class no longer pickles for a real deploy.
So every bind of the Producer (the `http` fixture, the CLI test) comes before the first local-mode test
in this file, the `local` fixture depends on `http`, and its teardown removes what the replica left on
the app (for later modules' real deploys, e.g. test_ui.py's browser test).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

import index.search
import serving.producer as producer_mod
from index.build import build_index, upsert_items
from index.config import IndexConfig
from serving.api import BatchRequest, CandidatesRequest, EventRequest, MixRequest
from serving.asks import Ask, Features
from serving.config import ProducerConfig
from serving.online import read_sequences
from serving.producer import producer_app
from serving.sources import ModelSource, SimilarSource
from serving.state import load_state
from tests.producer_world import (
    COLD_ID,
    FIRST_ID,
    MAX_LEN,
    N_ITEMS,
    TEACHER,
    UNKNOWN_USER,
    USERS,
    World,
    available,
    category,
    free_port,
    write_world,
)
from training.data import build_inputs
from training.model import SeqRec
from vlmrec.features import SequenceReader, historical_sequences, online_sequences, open_store

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return write_world(tmp_path_factory.mktemp("serving"))


def local_config(world: World) -> ProducerConfig:
    return replace(world.config, feature_timeout_s=1.0, search_timeout_s=1.0)


@pytest.fixture(scope="module")
def local(world, http):
    """The Producer in Serve's local testing mode: in-process, 1 s timeouts for the failure tests."""
    from ray import serve

    app = ingress_app()
    handlers = dict(app.exception_handlers)
    handle = serve.run(producer_app(local_config(world)), name="local", _local_testing_mode=True)
    deadline = time.monotonic() + 30  # local mode does not wait for reconfigure(): wait as a probe would
    while handle.readyz.remote().result().status_code != 200:
        assert time.monotonic() < deadline, "the local Producer never became ready"
        time.sleep(0.1)
    yield handle
    # Undo what the local replica left on the ingress's FastAPI app (see the top): later modules deploy the
    # Producer for real, and the class must pickle again.
    app.exception_handlers.clear()
    app.exception_handlers.update(handlers)
    app.middleware_stack = None


def ingress_app():
    """The FastAPI app @serve.ingress froze into the Producer class (a copy of serving.producer.api)."""
    from fastapi import FastAPI

    init = producer_mod.Producer.func_or_class.__init__
    return next(c.cell_contents for c in init.__closure__ if isinstance(c.cell_contents, FastAPI))


@pytest.fixture(scope="module")
def http(world, ray_local):
    """A real Serve deployment behind the HTTP proxy on 127.0.0.1:<free port>; an httpx client to it."""
    from serving.cli import start, stop

    url = start(world.config, port=free_port())
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client
    stop()


def call(handle, method: str, body) -> tuple[int, dict]:
    """A local-mode call of a route method -> (status, JSON body)."""
    resp = getattr(handle, method).remote(body).result()
    return resp.status_code, json.loads(resp.body)


def ids_of(body: dict) -> list[int]:
    return [c["item_id"] for c in body["candidates"]]


def scores_of(body: dict) -> np.ndarray:
    return np.array([c["score"] for c in body["candidates"]])


# ------------------------------------------------------------------------------------- correctness


def test_http_candidates_exact_with_filters_and_seen(world, http):
    u = 2
    seen = world.history(u)
    r = http.post("/v1/candidates", json={"user_id": u, "k": 5})
    assert r.status_code == 200, r.text
    assert ids_of(r.json()) == world.exact_top(seen, 5, exclude=seen)[0]

    r = http.post(
        "/v1/candidates", json={"user_id": u, "k": 50, "filters": {"category": "a", "available": True}}
    )
    mask = np.array([category(i) == "a" and available(i) for i in world.vocab.item_ids])
    assert ids_of(r.json()) == world.exact_top(seen, 50, exclude=seen, mask=mask)[0]
    assert any("only" in w for w in r.json()["warnings"]), "fewer than k qualify: said so"

    r = http.post(
        "/v1/candidates",
        json={"user_id": u, "k": 5, "exclude_seen": False, "filters": {"category": ["a", "b"]}},
    )
    assert ids_of(r.json()) == world.exact_top(seen, 5)[0]

    recent = [FIRST_ID + 33, FIRST_ID + 34]  # appended after the stored sequence, and excluded
    r = http.post("/v1/candidates", json={"user_id": u, "k": 5, "recent_item_ids": recent})
    assert ids_of(r.json()) == world.exact_top(seen + recent, 5, exclude=seen + recent)[0]


def test_http_concurrent_single_requests_are_coalesced_each_answered_as_alone(world, http):
    """Through a real Serve deployment: concurrent /v1/candidates calls share batches (batch_size > 1 in
    their answers), and each caller's list is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    reqs = [
        {"user_id": u, "k": 3 + u % 4, "producer": p}
        for u in (1, 2, 3, 4, UNKNOWN_USER)
        for p in ("student", "sasrec", "similar", "popular")
    ]
    alone = [http.post("/v1/candidates", json=r).json() for r in reqs]

    def ask(r):
        with httpx.Client(base_url=str(http.base_url), timeout=30) as c:
            return c.post("/v1/candidates", json=r).json()

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, reqs * 4))
    assert max(t["batch_size"] for t in together) > 1, "no batch formed under 16 concurrent clients"
    for a, t in zip(alone * 4, together, strict=True):
        assert ids_of(t) == ids_of(a) and t["fallback"] == a["fallback"] and t["producer"] == a["producer"]
        np.testing.assert_allclose(scores_of(t), scores_of(a), rtol=1e-5, atol=1e-6)


def test_skew_online_input_equals_offline_input(world):
    """The Producer's model input (online store) == training's (point-in-time historical read). The online
    side is the pipeline's own: the feature read, Ask.of and the source's inputs()."""
    state = load_state(world.config)
    store = state.store

    def producer_input(store, u, extra, vocab, max_len):
        features = Features(read_sequences(store, [u]), None, 0.0)
        ask = Ask.of([CandidatesRequest(user_id=u, recent_item_ids=extra or None)], features, state.config)
        student = state.sources["student"]
        assert (student.vocab.item_ids == vocab.item_ids).all() and student.max_len == max_len
        return student.inputs(ask, [0]).ids[0]

    last = world.events.groupby("user_id")["event_timestamp"].max().reset_index()
    last["event_timestamp"] += pd.Timedelta(seconds=1)
    offline = historical_sequences(store, last)
    recent = [FIRST_ID + 5, COLD_ID]  # the cold id is dropped on both paths
    for u, seq in zip(offline["user_id"], offline["item_ids"], strict=True):
        if u in (5, 6):  # the event tests push to these users' online sequences
            continue
        for extra in ([], recent):
            want = build_inputs([[*seq, *extra]], world.vocab, MAX_LEN).ids[0]
            np.testing.assert_array_equal(producer_input(store, u, extra, world.vocab, MAX_LEN), want)
            assert (want > 0).any()
    state.close()


def test_the_producers_metrics_endpoint_has_request_counters_and_latency_histograms(world, http):
    """Issue 19: what a Prometheus scrape of a Producer's node gets (Ray's metrics endpoint, the port a
    PodMonitor scrapes in Kubernetes): Serve's request counter and latency histogram, and the Producer's own
    answer counter, stage latency histogram and batch sizes, tagged by producer."""
    import ray

    for u in USERS:
        assert http.post("/v1/candidates", json={"user_id": u, "k": 5}).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "ray_serve_num_http_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_vlmrec_producer_requests_total",
        "ray_vlmrec_producer_stage_ms_bucket",
        "ray_vlmrec_producer_batch_size_bucket",
    }
    deadline, found = time.monotonic() + 60, set()  # Ray exports its metrics every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        found = {line.split("{")[0] for line in samples} & wanted
        if found == wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert found == wanted, sorted(wanted - found)
    answered = [line for line in samples if line.startswith("ray_vlmrec_producer_requests_total{")]
    assert any(
        'producer="student"' in line and float(line.rsplit(" ", 1)[1]) >= len(USERS) for line in answered
    )
    stages = {
        line.split('stage="')[1].split('"')[0]
        for line in samples
        if "vlmrec_producer_stage_ms_bucket" in line
    }
    assert {"feature", "model", "search"} <= stages, stages


def test_batch_equals_single_calls_in_order(world, http):
    reqs = [
        {"user_id": 1, "k": 7},
        {"user_id": UNKNOWN_USER, "k": 3},
        {"user_id": 3, "k": 4, "filters": {"category": "b"}},
        {"user_id": 1, "k": 5, "recent_item_ids": [FIRST_ID + 1], "exclude_seen": False},
    ]
    r = http.post("/v1/candidates:batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    batch = r.json()["responses"]
    assert len(batch) == len(reqs)
    for req, got in zip(reqs, batch, strict=True):
        single = http.post("/v1/candidates", json=req).json()
        assert ids_of(got) == ids_of(single) and got["fallback"] == single["fallback"]
        np.testing.assert_allclose(scores_of(got), scores_of(single), atol=1e-5)
    assert http.post("/v1/candidates:batch", json={"requests": []}).json() == {"responses": []}


def second_student_run(world, name: str = "student-b") -> None:
    """Another student run beside the world's, with its own index (indexes/<run>, as `index build --run`)."""
    export = world.ws.runs / name / "export"
    if (export / "run.json").exists():
        return
    torch.manual_seed(2)
    model = SeqRec(
        world.model.cfg, teacher=world.vocab.teacher_matrix(), item_ids=world.model.item_ids.numpy()
    )
    torch.nn.init.normal_(model.adapter[-1].weight, std=0.3)
    model.save_pretrained(export / "model")
    with torch.no_grad():
        vectors = SeqRec.from_pretrained(export / "model").item_vectors()[1:].numpy()
    frame = pd.DataFrame({"item_id": world.vocab.item_ids, "vector": list(vectors), "teacher_id": TEACHER})
    frame.to_parquet(export / "item_vectors.parquet")
    shutil.copy(world.export / "popular.json", export / "popular.json")
    (export / "run.json").write_text(json.dumps({"name": name, "teacher_id": TEACHER, "configs": {}}))
    build_index(
        export / "item_vectors.parquet",
        world.ws.items,
        world.ws.named_index(name),
        IndexConfig(quantization=False),
    )


# Here, before the local-mode tests: redeploying needs the Producer class to pickle, which they stop.
def test_two_student_runs_serve_side_by_side_as_arms_of_an_experiment(world, http):
    """Issue 18: an experiment's arms, each a producer and a run, in one deployment; every default-traffic
    answer names its user's arm (sticky, forced users pinned) and comes from that arm's run; a request naming
    its producer stays outside; the exposure log records the arm."""
    from serving.cli import start
    from serving.experiments import Experiment
    from serving.exposures import read_exposures

    second_student_run(world)
    experiment = {
        "name": "student-b-test",
        "arms": [
            {"name": "control", "producer": "student", "share": 0.5},
            {"name": "b", "producer": "student", "run": "student-b", "share": 0.5},
        ],
        "force": {1: "b", 2: "control"},
    }
    port = http.base_url.port
    start(replace(world.config, experiment=experiment), port=port)  # a config update of the running app
    try:
        exp = Experiment.from_dict(experiment)
        ready = http.get("/readyz").json()  # the arm's own run is a producer of its own, and must be ready
        assert ready["ready"] and ready["producers"]["arm:b"]["model_version"].startswith("student-b@")
        arms, rids = {}, {}
        for u in USERS:
            got = http.post("/v1/candidates", json={"user_id": u, "k": 5}).json()
            arm = exp.assign(u).name
            assert got["arm"] == arm and got["producer"] == "student"
            assert got["model_version"].startswith("student-b@" if arm == "b" else "student@"), got
            assert http.post("/v1/candidates", json={"user_id": u, "k": 5}).json()["arm"] == arm  # sticky
            arms[u], rids[got["request_id"]] = arm, arm
        assert arms[1] == "b" and arms[2] == "control"  # forced
        b = http.post("/v1/candidates", json={"user_id": 1, "k": 5}).json()
        named = http.post("/v1/candidates", json={"user_id": 1, "k": 5, "producer": "student"}).json()
        assert named["arm"] is None and named["model_version"].startswith(
            "student@"
        )  # outside the experiment
        assert ids_of(named) != ids_of(b)  # the two runs rank differently
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            logged = {r["request_id"]: r["arm"] for r in read_exposures(str(world.ws.exposures)).to_pylist()}
            if set(rids) <= set(logged):
                break
            time.sleep(0.2)
        assert {rid: logged.get(rid) for rid in rids} == rids
    finally:
        start(world.config, port=port)
    assert http.post("/v1/candidates", json={"user_id": 1, "k": 5}).json()["arm"] is None


def test_mixer_arms_choose_the_default_blend_of_each_users_mix(world, http):
    """Issue 18: a Mixer experiment: /v1/mix requests without quotas or weights get their user's arm's
    weights (named in the answer and the exposure); requests that give weights stay outside it."""
    from serving.cli import start
    from serving.experiments import Experiment

    experiment = {
        "name": "blend-test",
        "arms": [
            {"name": "popular-only", "share": 0.5, "weights": {"popular": 1}},
            {"name": "student-only", "share": 0.5, "weights": {"student": 1}},
        ],
        "force": {1: "popular-only", 2: "student-only"},
    }
    port = http.base_url.port
    start(replace(world.config, experiment=experiment), port=port)
    try:
        exp = Experiment.from_dict(experiment)
        for u in USERS:
            got = http.post("/v1/mix", json={"user_id": u, "k": 6}).json()
            arm = exp.assign(u)
            assert got["arm"] == arm.name and {c["producer"] for c in got["candidates"]} == set(arm.weights)
            assert http.post("/v1/candidates", json={"user_id": u, "k": 3}).json()["arm"] is None  # mix only
        own = http.post("/v1/mix", json={"user_id": 1, "k": 4, "weights": {"sasrec": 1}}).json()
        assert own["arm"] is None and {c["producer"] for c in own["candidates"]} == {"sasrec"}
    finally:
        start(world.config, port=port)


def test_an_update_the_replicas_cannot_load_is_refused_and_the_previous_config_serves_on(
    world, http, tmp_path
):
    """A config update whose files the live replicas cannot load, where `vlmrec serve`'s preflight does not
    look (here the student's Edge version is corrupt: its files are there, they do not open): each replica
    keeps serving its state (Serve would otherwise replace it by a replica with the bad config, and none
    would serve: every route a 503), `start` (vlmrec serve; vlmrec refresh's local swap) raises NotDeployed
    with the replicas' own error (the CLI's error line), and the previous config is deployed again. No copy
    of the bad version is left behind."""
    from ray import serve

    from serving.cli import APP_NAME, NotDeployed, start

    bad = tmp_path / "index"
    shutil.copytree(world.ws.index, bad, ignore=shutil.ignore_patterns("replicas"))
    broken = list((bad / "versions").glob("*/shard/segments/*/version.info"))
    assert broken
    for f in broken:
        f.write_text("")
    version = json.loads((bad / "CURRENT").read_text())["version"]
    before = http.post("/v1/candidates", json={"user_id": USERS[0], "k": 5}).json()
    answers: list[int] = []
    stop = threading.Event()

    def ask() -> None:  # the callers' view during the update
        while not stop.is_set():
            answers.append(http.post("/v1/candidates", json={"user_id": USERS[0], "k": 5}).status_code)
            time.sleep(0.05)

    caller = threading.Thread(target=ask)
    caller.start()
    port = http.base_url.port
    try:
        with pytest.raises(NotDeployed, match=f"the Producer kept its previous config: ValueError: the index "
                           f"version {version} at {bad}/versions/{version}/shard does not open"):  # fmt: skip
            start(replace(world.config, index_dir=str(bad)), port=port)
    finally:
        stop.set()
        caller.join()
    assert answers and set(answers) == {200}, answers
    after = http.post("/v1/candidates", json={"user_id": USERS[0], "k": 5}).json()
    assert ids_of(after) == ids_of(before) and after["index_version"] == before["index_version"]
    ready = http.get("/readyz").json()
    assert ready["ready"] and ready["update_error"] is None  # the previous config, applied again
    assert serve.status().applications[APP_NAME].status == "RUNNING"
    assert not any((bad / "replicas").iterdir())


def test_an_experiment_arm_that_cannot_load_is_a_bad_config(world):
    bad = {"name": "x", "arms": [{"name": "a", "producer": "student", "run": "no-such-run", "share": 1.0}]}
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        load_state(replace(world.config, experiment=bad))
    with pytest.raises(ValueError, match="sum to 1"):
        replace(
            world.config,
            experiment={"name": "x", "arms": [{"name": "a", "producer": "student", "share": 0.4}]},
        )


def test_every_answer_has_a_request_id_and_one_exposure_record(world, http):
    """Issue 18: the caller's X-Request-ID (else a new one) in the answer and its header; one exposure per
    answered request (:batch: one per answer), holding exactly the items served."""
    from serving.exposures import read_exposures

    tag = uuid.uuid4().hex[:8]
    answers = {}
    for n, user in enumerate([1, 3, UNKNOWN_USER]):
        r = http.post(
            "/v1/candidates", json={"user_id": user, "k": 5}, headers={"X-Request-ID": f"{tag}-c{n}"}
        )
        assert r.status_code == 200 and r.json()["request_id"] == r.headers["X-Request-ID"] == f"{tag}-c{n}"
        answers[f"{tag}-c{n}"] = (user, r.json())
    r = http.post("/v1/candidates", json={"user_id": 1, "k": 4})
    own = r.json()["request_id"]
    assert own and r.headers["X-Request-ID"] == own  # none given: the one Serve's proxy made and returns
    answers[own] = (1, r.json())
    r = http.post("/v1/candidates:batch", json={"requests": [{"user_id": 1, "k": 2}, {"user_id": 3, "k": 3}]},
                  headers={"X-Request-ID": f"{tag}-b"})  # fmt: skip
    for i, (user, got) in enumerate(zip([1, 3], r.json()["responses"], strict=True)):
        assert got["request_id"] == f"{tag}-b.{i}"
        answers[f"{tag}-b.{i}"] = (user, got)
    r = http.post("/v1/mix", json={"user_id": 3, "k": 6}, headers={"X-Request-ID": f"{tag}-m"})
    assert r.status_code == 200 and r.json()["request_id"] == f"{tag}-m"
    mix = r.json()
    bad = http.post("/v1/candidates", json={"user_id": 1}, headers={"X-Request-ID": "no spaces allowed"})
    assert bad.status_code == 422 and "x-request-id" in bad.json()["message"].lower()

    want = {*answers, f"{tag}-m"}
    deadline = time.monotonic() + 15  # the writer flushes every log_flush_s (1 s)
    while True:
        table = read_exposures(str(world.ws.root / "exposures"))
        rows = {r["request_id"]: r for r in table.to_pylist() if r["request_id"] in want}
        if len(rows) == len(want) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(rows) == want  # one record per answered request, nothing for the 422
    assert sum(r in want for r in table["request_id"].to_pylist()) == len(want)  # exactly one each
    for rid, (user, got) in answers.items():
        row = rows[rid]
        assert (
            row["user_id"] == user
            and row["producer"] == got["producer"]
            and row["fallback"] == got["fallback"]
        )
        assert row["model_version"] == got["model_version"] and row["index_version"] == got["index_version"]
        assert [(i["item_id"], i["rank"]) for i in row["items"]] == [
            (c["item_id"], c["rank"]) for c in got["candidates"]
        ]
        assert row["endpoint"] == ("batch" if ".b" in rid or "-b." in rid else "candidates")
    m = rows[f"{tag}-m"]
    assert m["endpoint"] == "mix" and m["producer"] == "mix"
    assert [(i["item_id"], i["producer"]) for i in m["items"]] == [
        (c["item_id"], c["producer"]) for c in mix["candidates"]
    ]


# ---------------------------------------------------------------------------------- bad input, fallbacks

BAD = [
    ("/v1/candidates", {"user_id": 1, "k": 0}, "k"),
    ("/v1/candidates", {"user_id": 1, "k": 1001}, "k"),
    ("/v1/candidates", {"user_id": "abc"}, "user_id"),
    ("/v1/candidates", {"k": 5}, "user_id"),
    ("/v1/candidates", {"user_id": -1}, "user_id"),
    ("/v1/candidates", {"user_id": 1, "filters": {"category": 5}}, "filters.category"),
    ("/v1/candidates", {"user_id": 1, "filters": {"available": "maybe"}}, "filters.available"),
    ("/v1/candidates", {"user_id": 1, "filters": "a"}, "filters"),
    ("/v1/candidates", {"user_id": 1, "filters": {"colour": "red"}}, "filters.colour"),
    ("/v1/candidates", {"user_id": 1, "filters": {"category": []}}, "filters.category"),
    ("/v1/candidates", {"user_id": 1, "recent_item_ids": [1, "x"]}, "recent_item_ids.1"),
    ("/v1/candidates", {"user_id": 1, "kk": 5}, "kk"),
    ("/v1/candidates:batch", {"requests": [{"user_id": 1}, {"user_id": 1, "k": 0}]}, "requests.1.k"),
    ("/v1/candidates:batch", {"requests": {"user_id": 1}}, "requests"),
    ("/v1/events", {"user_id": 1, "item_id": "x"}, "item_id"),
    ("/v1/events", {"user_id": 1, "item_id": 99999}, "item_id"),  # well-typed but unknown
    ("/v1/events", {"item_id": FIRST_ID}, "user_id"),
    ("/v1/candidates", {"user_id": 1, "producer": "nope"}, "producer"),
    ("/v1/mix", {"user_id": 1, "quotas": {"nope": 1}}, "quotas.nope.[key]"),
    ("/v1/mix", {"user_id": 1, "quotas": {"student": 1}, "weights": {"student": 1}}, "quotas"),
    ("/v1/mix", {"user_id": 1, "k": 3, "quotas": {"student": 2}}, "k"),
    ("/v1/mix", {"user_id": 1, "quotas": {"student": -1}}, "quotas.student"),
    ("/v1/mix", {"user_id": 1, "weights": {"student": 0}}, "weights"),
    ("/v1/mix", {"user_id": 1, "budget_ms": 0}, "budget_ms"),
    ("/v1/mix", {"user_id": 1, "k": 1001}, "k"),
    # issue 16: strict types (no coercion of true to 1, "no" to a bool, 5.0 to an int, numbers to times)
    ("/v1/candidates", {"user_id": 1, "k": True}, "k"),
    ("/v1/candidates", {"user_id": 1, "k": 5.0}, "k"),
    ("/v1/candidates", {"user_id": True}, "user_id"),
    ("/v1/candidates", {"user_id": 1, "exclude_seen": "no"}, "exclude_seen"),
    ("/v1/candidates", {"user_id": 1, "filters": {"category": "x" * 300}}, "filters.category"),
    ("/v1/mix", {"user_id": 1, "weights": {"student": True}}, "weights.student"),
    ("/v1/mix", {"user_id": 1, "budget_ms": True}, "budget_ms"),
    ("/v1/mix", {"user_id": 1, "quotas": {"student": 2.0}}, "quotas.student"),
    # issue 16: an out-of-range event time was a 503 "retry"; now a 422 naming it, before any write
    (
        "/v1/events",
        {"user_id": 1, "item_id": FIRST_ID, "event_timestamp": "0001-01-01T00:00:00Z"},
        "event_timestamp",
    ),
    (
        "/v1/events",
        {"user_id": 1, "item_id": FIRST_ID, "event_timestamp": "9999-12-31T00:00:00Z"},
        "event_timestamp",
    ),
    ("/v1/events", {"user_id": 1, "item_id": FIRST_ID, "event_timestamp": 1700000000}, "event_timestamp"),
    ("/v1/events", {"user_id": 1, "item_id": FIRST_ID, "event_timestamp": "yesterday"}, "event_timestamp"),
    (
        "/v1/events",
        {"user_id": 1, "item_id": FIRST_ID, "event_type": "wishlist"},
        "event_type",
    ),  # not configured
    ("/v1/events", {"user_id": 1, "item_id": FIRST_ID, "position": 0}, "position"),
    ("/v1/events", {"user_id": 1, "item_id": FIRST_ID, "request_id": "has spaces"}, "request_id"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
def test_bad_input_is_422_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == "invalid_request" and f"{field}:" in err["message"], err
    assert "Traceback" not in r.text


def test_malformed_json_is_422(http):
    r = http.post("/v1/candidates", content=b'{"user_id": 1,', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


JSON = {"content-type": "application/json"}
# Issue 16: NaN, Infinity or a number beyond float range in a body was a 500: the 422 handler echoed the
# value and the JSON encoder could not write it. Sent raw: these are what Python's json module accepts.
RAW_422 = [
    ("/v1/candidates", b'{"user_id": 7, "k": NaN}', "k"),
    ("/v1/candidates", b'{"user_id": 1e400}', "user_id"),
    ("/v1/candidates", b'{"user_id": -Infinity}', "user_id"),
    ("/v1/candidates", b'{"user_id": 1, "recent_item_ids": [1000, Infinity]}', "recent_item_ids.1"),
    ("/v1/candidates", b'{"user_id": 123456789012345678901234567890123456789}', "user_id"),
    ("/v1/mix", b'{"user_id": 1, "weights": {"popular": 1e400}}', "weights.popular"),
    ("/v1/mix", b'{"user_id": 1, "budget_ms": NaN}', "budget_ms"),
    ("/v1/events", b'{"user_id": 1, "item_id": NaN}', "item_id"),
]


@pytest.mark.parametrize(("path", "raw", "field"), RAW_422, ids=[f"{p}-{f}" for p, _, f in RAW_422])
def test_non_finite_and_huge_numbers_are_422_naming_the_field(http, path, raw, field):
    r = http.post(path, content=raw, headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and r.json()["message"].startswith(f"{field}:"), r.text


def test_huge_mix_weights_are_ratios_not_a_500(http):
    """Issue 16: {"weights": {"popular": 1e308}} was a 500 (an overflow before floor)."""
    r = http.post("/v1/mix", json={"user_id": 1, "k": 4, "weights": {"popular": 1e308, "student": 1e308}})
    assert r.status_code == 200, r.text
    assert {p: rep["quota"] for p, rep in r.json()["producers"].items()} == {"popular": 2, "student": 2}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "\xff\xfe"}',
        b'{"user_id": "\xc3\x28"}',
        b"[" * 10_000 + b"]" * 10_000,
        b"1" * 5000,
    ],
    ids=["latin-1", "bad-utf8", "10000-deep", "5000-digits"],
)
def test_unparseable_bodies_are_400_in_the_error_shape(http, raw):
    """Issue 16: invalid UTF-8 or 10,000-deep JSON gave 400 {"detail": ...}, not {"error", "message"}."""
    r = http.post("/v1/candidates", content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "message"} and r.json()["error"] == "bad_request"


def test_routing_errors_have_the_error_shape(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = http.get("/v1/candidates")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_bodies_above_the_limit_are_413_before_parsing(http):
    """Issue 16: a 25 MB recent_item_ids body was parsed for 15 s before its 422, and a small request
    beside it waited 6 s. Now it is refused by its size: declared (content-length) or counted (chunked)."""
    from serving.api import MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES

    big = b'{"user_id": 1, "recent_item_ids": [' + b"1000," * (5 << 20) + b"1000]}"  # 25 MB
    slow: list[float] = []

    def small_requests():
        for _ in range(10):
            t0 = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            slow.append(time.perf_counter() - t0)

    beside = threading.Thread(target=small_requests)
    t0 = time.perf_counter()
    beside.start()
    r = http.post("/v1/candidates", content=big, headers=JSON)
    took = time.perf_counter() - t0
    beside.join()
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
    assert str(MAX_BODY_BYTES) in r.json()["message"]
    assert took < 5.0 and max(slow) < 2.0, (took, max(slow))  # generous: this box is shared

    def chunks():  # no content-length: counted as it arrives
        yield b'{"user_id": 1, "recent_item_ids": ['
        for _ in range(64):
            yield b"1000," * 8192
        yield b"1000]}"

    r = http.post("/v1/candidates", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    # the batch route has its own, larger limit: a batch of 256 requests with 1000 recent ids each fits
    batch = {"requests": [{"user_id": u, "k": 1, "recent_item_ids": [FIRST_ID] * 1000} for u in range(256)]}
    raw = json.dumps(batch).encode()
    assert MAX_BODY_BYTES < len(raw) < MAX_BATCH_BODY_BYTES
    assert http.post("/v1/candidates:batch", content=raw, headers=JSON).status_code == 200


def test_openapi_lists_every_error_status(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/candidates", "/v1/candidates:batch", "/v1/mix", "/v1/events"):
        codes = set(spec["paths"][path]["post"]["responses"])
        assert {"200", "400", "413", "422", "500", "503"} <= codes, (path, codes)
    assert {"401", "409"} <= set(spec["paths"]["/v1/events"]["post"]["responses"])


def test_unknown_recent_ids_are_a_warning(world, http):
    r = http.post("/v1/candidates", json={"user_id": 1, "k": 5, "recent_item_ids": [COLD_ID, 999999]})
    assert r.status_code == 200 and r.json()["fallback"] is None
    (warning,) = [w for w in r.json()["warnings"] if w.startswith("recent_item_ids")]
    assert str(COLD_ID) in warning and "999999" in warning
    assert ids_of(r.json()) == world.exact_top(world.history(1), 5, exclude=world.history(1))[0]


def test_unknown_user_gets_popular_items(world, http):
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 5})
    assert r.status_code == 200 and r.json()["fallback"] == "unknown_user"
    assert ids_of(r.json()) == world.popular[:5]
    body = {
        "user_id": UNKNOWN_USER,
        "k": 4,
        "recent_item_ids": [COLD_ID, 999999],
        "filters": {"category": "b"},
    }
    r = http.post("/v1/candidates", json=body).json()  # recent ids unknown to the model: still no user vector
    assert r["fallback"] == "unknown_user"
    assert ids_of(r) == [i for i in world.popular if category(i) == "b"][:4]
    recent = world.popular[:2]  # known recent clicks are enough for a user vector
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "recent_item_ids": recent}).json()
    assert r["fallback"] is None and ids_of(r) == world.exact_top(recent, 4, exclude=recent)[0]


# ------------------------------------------------------------------------------- sibling producers


def test_http_every_producer_answers_the_same_contract_exactly(world, http):
    """student (default), sasrec (dot product of id embeddings), similar (teacher neighbours of the last 3
    clicks) and popular (recency-weighted counts), each against numpy on the same user."""
    u, k = 2, 6
    seen = world.history(u)
    want = {
        "student": world.exact_top(seen, k, exclude=seen)[0],
        "sasrec": world.sasrec_top(seen, k, exclude=seen),
        "similar": world.similar_top(seen, k, last_n=3, exclude=seen),
        "popular": world.popular_top(k, exclude=seen),
    }
    for name, ids in want.items():
        r = http.post("/v1/candidates", json={"user_id": u, "k": k, "producer": name})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["producer"] == name and body["fallback"] is None and ids_of(body) == ids, name
        assert [c["rank"] for c in body["candidates"]] == list(range(1, k + 1))
        assert (body["index_version"] is None) == (name == "popular")
        assert set(body["timings_ms"]) == {"feature", "model", "search", "total"}
    assert http.post("/v1/candidates", json={"user_id": u, "k": k}).json()["producer"] == "student"
    r = http.post("/v1/candidates", json={"user_id": u, "k": 3, "producer": "sasrec"}).json()
    user = world.sasrec.user_vector(torch.as_tensor(build_inputs([seen], world.vocab, MAX_LEN).ids))[0]
    dots = world.sasrec_vectors[world.vocab.index_of(ids_of(r)) - 1] @ user.detach().numpy()
    np.testing.assert_allclose(scores_of(r), dots, rtol=1e-4)  # dot products, not cosines
    assert r["model_version"].startswith("sasrec@")
    r = http.post(
        "/v1/candidates", json={"user_id": u, "k": 4, "producer": "popular", "filters": {"category": "b"}}
    ).json()
    assert ids_of(r) == [i for i in world.popular_top(N_ITEMS, exclude=seen) if category(i) == "b"][:4]


def test_http_fallbacks_are_the_same_for_every_producer(world, http):
    for name, popular in (("sasrec", world.popular), ("similar", world.popular_top(N_ITEMS))):
        r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "producer": name}).json()
        assert r["fallback"] == "unknown_user" and ids_of(r) == popular[:4], name
        recent = [FIRST_ID + 7, FIRST_ID + 9]  # known clicks are enough to personalise
        r = http.post(
            "/v1/candidates",
            json={"user_id": UNKNOWN_USER, "k": 4, "producer": name, "recent_item_ids": recent},
        ).json()
        assert r["fallback"] is None, name
    r = http.post("/v1/candidates", json={"user_id": UNKNOWN_USER, "k": 4, "producer": "popular"}).json()
    assert r["fallback"] is None and ids_of(r) == world.popular_top(4)
    r = http.post(
        "/v1/candidates",
        json={"user_id": UNKNOWN_USER, "k": 3, "producer": "similar", "recent_item_ids": [COLD_ID]},
    ).json()  # a click the teacher index does not hold: named, then the same fallback
    assert r["fallback"] == "unknown_user" and any(str(COLD_ID) in w for w in r["warnings"])


def test_http_batch_mixes_producers_in_order(http):
    reqs = [{"user_id": 1, "k": 4, "producer": p} for p in ("similar", "student", "popular", "sasrec")]
    reqs.append({"user_id": 3, "k": 2, "producer": "similar", "filters": {"category": "a"}})
    batch = http.post("/v1/candidates:batch", json={"requests": reqs}).json()["responses"]
    for req, got in zip(reqs, batch, strict=True):
        single = http.post("/v1/candidates", json=req).json()
        assert got["producer"] == req["producer"] and ids_of(got) == ids_of(single)


def test_http_mix_honours_quotas_without_duplicates(world, http):
    u = 3
    seen = world.history(u)
    quotas = {"student": 4, "similar": 3, "sasrec": 2, "popular": 1}
    r = http.post("/v1/mix", json={"user_id": u, "quotas": quotas})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [c["item_id"] for c in body["candidates"]]
    assert body["k"] == 10 and len(ids) == len(set(ids)) == 10 and not set(ids) & set(seen)
    assert {p: rep["taken"] for p, rep in body["producers"].items()} == quotas
    assert all(rep["status"] == "ok" for rep in body["producers"].values()) and body["warnings"] == []
    lists = {
        p: ids_of(http.post("/v1/candidates", json={"user_id": u, "k": 10, "producer": p}).json())
        for p in quotas
    }
    for c in body["candidates"]:
        assert c["sources"] == [p for p in quotas if c["item_id"] in lists[p]]
        assert c["ranks"] == {p: lists[p].index(c["item_id"]) + 1 for p in c["sources"]}
        assert c["producer"] in c["sources"]
    from serving.mixer import interleave

    expect, _ = interleave({p: [(i, 0.0) for i in lists[p]] for p in quotas}, quotas, 10)
    assert ids == [c["item_id"] for c in expect], "the HTTP Mixer blends exactly as serving/mixer.py"
    assert (
        http.post("/v1/mix", json={"user_id": u, "quotas": quotas}).json()["candidates"] == body["candidates"]
    )

    weighted = http.post(
        "/v1/mix", json={"user_id": u, "k": 8, "weights": {"student": 3, "popular": 1}}
    ).json()
    assert {p: rep["taken"] for p, rep in weighted["producers"].items()} == {"student": 6, "popular": 2}
    default = http.post("/v1/mix", json={"user_id": u, "k": 8}).json()
    assert set(default["producers"]) == {"student", "sasrec", "similar", "popular"}


def test_http_clicks_of_a_user(world, http):
    assert http.get("/v1/users/1/clicks").json() == {"user_id": 1, "item_ids": world.history(1)}
    assert http.get(f"/v1/users/{UNKNOWN_USER}/clicks").json()["item_ids"] == []
    r = http.get("/v1/users/-3/clicks")
    assert r.status_code == 422 and r.json()["message"].startswith("user_id:")


# ------------------------------------------------------------------------------------------- events


def test_event_is_seen_by_the_next_request(world, http):
    u = 5
    before = http.post("/v1/candidates", json={"user_id": u, "k": 10}).json()
    clicked = ids_of(before)[0]
    r = http.post("/v1/events", json={"user_id": u, "item_id": clicked, "event_type": "click"})
    assert r.status_code == 200, r.text
    answer = r.json()
    timings = answer.pop("timings_ms")
    assert answer == {"user_id": u, "item_id": clicked, "sequence_length": 8, "sequence_len_max": MAX_LEN}
    assert set(timings) == {"write", "total"} and 0 < timings["write"] <= timings["total"]
    assert online_sequences(open_store(world.ws), [u])[u] == [*world.history(u), clicked]
    after = http.post("/v1/candidates", json={"user_id": u, "k": 10}).json()
    assert clicked not in ids_of(after), "the clicked item is now seen"
    seq = [*world.history(u), clicked]
    assert ids_of(after) == world.exact_top(seq, 10, exclude=seq)[0], "the user vector moved with the click"
    for name, want in (
        ("sasrec", world.sasrec_top(seq, 10, exclude=seq)),
        ("similar", world.similar_top(seq, 10, last_n=3, exclude=seq)),
        ("popular", world.popular_top(10, exclude=seq)),
    ):
        got = http.post("/v1/candidates", json={"user_id": u, "k": 10, "producer": name}).json()
        assert ids_of(got) == want, f"{name} reflects the click"
    # a cold item (in the catalogue, not in the index) is a known item: accepted
    assert http.post("/v1/events", json={"user_id": u, "item_id": COLD_ID}).status_code == 200


def test_concurrent_clicks_of_one_user_are_not_lost(world, http):
    u, clicks = 6, list(range(FIRST_ID, FIRST_ID + 20))
    stored = world.history(u)
    statuses, lengths = [], []

    def click(item):
        r = http.post("/v1/events", json={"user_id": u, "item_id": item})
        statuses.append(r.status_code)
        lengths.append(r.json().get("sequence_length"))

    threads = [threading.Thread(target=click, args=(i,)) for i in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 20
    final = online_sequences(open_store(world.ws), [u])[u]
    assert len(final) == MAX_LEN, "bounded by N"
    assert sorted(final[-20:]) == clicks, "every concurrent click is in the sequence"
    assert final[:4] == stored[-4:]
    assert sorted(lengths) == [min(len(stored) + i, MAX_LEN) for i in range(1, 21)], "one append at a time"


def test_events_are_kept_with_the_answer_they_followed_in_the_event_log(world, http):
    """Issue 18: an event names the answer it followed (request_id, position) and its type; every accepted
    one is in the event log (data/events_log, read by `vlmrec ingest --logged`), tied to its exposure."""
    from serving.exposures import read_exposures
    from serving.parquet_log import read_log
    from vlmrec.schema import EVENTS_LOG

    u = 5  # the event tests above already moved this user's online sequence
    answer = http.post("/v1/candidates", json={"user_id": u, "k": 5}).json()
    rid, shown = answer["request_id"], answer["candidates"][2]["item_id"]
    r = http.post(
        "/v1/events",
        json={"user_id": u, "item_id": shown, "event_type": "add_to_cart", "request_id": rid, "position": 3},
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15  # both writers flush every log_flush_s (1 s)
    while time.monotonic() < deadline:
        logged = read_log(str(world.ws.events_log), EVENTS_LOG).to_pylist()
        mine = [e for e in logged if e["request_id"] == rid]
        exposed = [x for x in read_exposures(str(world.ws.exposures)).to_pylist() if x["request_id"] == rid]
        if mine and exposed:
            break
        time.sleep(0.2)
    assert [(e["user_id"], e["item_id"], e["event_type"], e["position"]) for e in mine] == [
        (u, shown, "add_to_cart", 3)
    ]
    assert exposed[0]["items"][2]["item_id"] == shown  # position 3 of the answer it followed


def test_late_events_are_merged_by_time_or_refused_saying_why(http):
    """Issue 16: a click stamped before the user's last one was answered 200 and never stored (Redis; the
    same path on Redis: test_serving_events.py). Now it is placed by its time, and read back before 200."""
    u, t = 777_001, pd.Timestamp("2025-06-01T12:00:00Z")

    def post(item, ts):
        return http.post(
            "/v1/events", json={"user_id": u, "item_id": item, "event_timestamp": ts.isoformat()}
        )

    assert post(FIRST_ID + 1, t).status_code == 200
    r = post(FIRST_ID + 2, t - pd.Timedelta(minutes=10))  # late
    assert r.status_code == 200 and r.json()["sequence_length"] == 2, r.text
    assert http.get(f"/v1/users/{u}/clicks").json()["item_ids"] == [FIRST_ID + 2, FIRST_ID + 1]
    for k in range(MAX_LEN):  # fill the sequence with newer clicks
        assert post(FIRST_ID + 3 + k % 20, t + pd.Timedelta(seconds=k + 1)).status_code == 200
    r = post(FIRST_ID + 39, t - pd.Timedelta(days=1))  # older than all of the last N: refused, said why
    assert r.status_code == 409 and r.json()["error"] == "event_refused", r.text
    assert f"last {MAX_LEN} clicks" in r.json()["message"]
    assert FIRST_ID + 39 not in http.get(f"/v1/users/{u}/clicks").json()["item_ids"]


# ------------------------------------------------------------------------------------------- probes


def test_probes(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["reasons"] == []
    producers = r.json()["producers"]
    assert sorted(producers) == ["popular", "sasrec", "similar", "student"]
    assert all(p["ready"] and p["reason"] is None for p in producers.values())
    assert producers["popular"]["index_version"] is None and producers["similar"]["index_version"]
    cache = producers["student"]["vector_cache"]  # user vectors reused by input, per model producer
    assert cache["entries"] <= cache["misses"] and cache["hits"] >= 0
    assert "vector_cache" not in producers["similar"]
    logs = r.json()["logs"]  # where the exposure and event logs go, and their counts
    assert logs["exposures"]["path"].endswith("exposures") and logs["events"]["path"].endswith("events_log")
    assert logs["exposures"]["dropped"] == logs["exposures"]["failed"] == 0


# ------------------------------------------------------------------------------------- config and CLI


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_k"):
        ProducerConfig(max_k=1001)
    with pytest.raises(ValueError, match="index_url"):
        ProducerConfig(index_backend="server")
    with pytest.raises(ValueError, match="unknown keys"):
        ProducerConfig.from_dict({"workdir": "w", "tiemout": 1})
    with pytest.raises(ValueError, match="producer must be one of"):
        ProducerConfig(producer="student-b")
    with pytest.raises(ValueError, match="popular_until"):
        ProducerConfig(popular_until="last tuesday")
    with pytest.raises(ValueError, match="scoring_time .* out of the range of times in UTC"):
        ProducerConfig(scoring_time="0001-01-01T00:00:00+01:00")  # a valid ISO time UTC cannot hold
    with pytest.raises(ValueError, match="mix_budget_ms"):
        ProducerConfig(mix_budget_ms=0)
    with pytest.raises(ValueError, match="vector_cache"):
        ProducerConfig(vector_cache=-1)
    assert ProducerConfig(popular_until="2016-03-22T08:26:11").popular_until_ts.tzinfo is not None
    assert ProducerConfig(workdir="w").sasrec_index_path == Path("w").absolute() / "indexes/sasrec"
    assert ProducerConfig.from_dict(None) == ProducerConfig()
    assert ProducerConfig(workdir="w").export_dir == Path("w").absolute() / "runs/student/export"


def test_cli_defaults_and_the_edge_environment(monkeypatch):
    from ray.serve import Application

    from serving.cli import config_from_args
    from serving.producer import build_app
    from vlmrec.cli import build_parser

    args = build_parser("serve").parse_args(["serve"])
    assert (args.host, args.port, args.replicas) == ("127.0.0.1", 8000, 1)
    assert config_from_args(args) == ProducerConfig(workdir=".vlmrec/sample")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    args = build_parser("serve").parse_args(["serve", "--index-backend", "server", "--run", "r2"])
    assert config_from_args(args) == ProducerConfig(
        workdir=".vlmrec/sample", run="r2", index_backend="server", index_url="http://qdrant:6333"
    )
    args = build_parser("serve").parse_args(["serve", "--scan-max-points", "0", "--hnsw-ef", "64"])
    assert config_from_args(args) == ProducerConfig(workdir=".vlmrec/sample", scan_max_points=0, hnsw_ef=64)
    assert isinstance(build_app({"workdir": "w", "default_k": "7", "search_timeout_s": "0.3"}), Application)
    # `serve run`'s key=value strings are cast to the field's type before the config checks them
    assert isinstance(build_app({"scan_max_points": "0", "hnsw_ef": "64"}), Application)


def test_server_backend_searches_the_configured_alias(monkeypatch):
    """One alias per served model (k8s: user_config index_alias), the api key from the environment only."""
    from index.config import IndexConfig
    from serving.loading import index_config

    monkeypatch.setenv("QDRANT_API_KEY", "k")
    cfg = ProducerConfig(index_backend="server", index_url="http://q:6333", index_alias="items-student-2")
    assert index_config(cfg) == IndexConfig(
        backend="server", url="http://q:6333", api_key="k", alias="items-student-2"
    )
    assert "k" not in cfg.to_dict().values()
    with pytest.raises(ValueError, match="index_alias"):
        ProducerConfig(index_alias="")
    tuned = replace(cfg, hnsw_ef=64, scan_max_points=0)  # the server has no scan: ef only
    assert index_config(tuned) == replace(index_config(cfg), hnsw_ef=64)


def test_search_settings_reach_the_replicas_index_copies(world):
    """user_config's hnsw_ef and scan_max_points open the Edge copies: a small version scanned by default,
    through its graph with scan_max_points 0; a bad value is refused, named."""
    for config, scanned in (
        (world.config, True),
        (replace(world.config, scan_max_points=0, hnsw_ef=64), False),
    ):
        state = load_state(config)
        try:
            index = state.sources["student"].index
            assert (index._replica.peek().scan is not None) is scanned
            assert index.config.hnsw_ef == config.hnsw_ef
        finally:
            state.close()
    for bad in ({"scan_max_points": -1}, {"hnsw_ef": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            replace(world.config, **bad)


# ---------------------------------------------------------- local testing mode (after every bind: see the top)


def test_local_mode_candidates_are_the_exact_top_k(world, local):
    for u in (1, 2, 3):
        status, body = call(local, "candidates", CandidatesRequest(user_id=u, k=10))
        assert status == 200 and body["fallback"] is None, body
        want, scores = world.exact_top(world.history(u), 10, exclude=world.history(u))
        assert ids_of(body) == want
        np.testing.assert_allclose(scores_of(body), scores, atol=1e-4)
        assert [c["rank"] for c in body["candidates"]] == list(range(1, 11))
        assert not set(ids_of(body)) & set(world.history(u)), "seen items are excluded"
    assert body["producer"] == "student" and body["model_version"].startswith("student@")
    assert body["index_version"].startswith("v") and set(body["timings_ms"]) == {
        "feature",
        "model",
        "search",
        "total",
    }


def test_feature_store_slow_falls_back_within_the_timeout(world, local, monkeypatch):
    def stuck(self, *args, **kwargs):
        time.sleep(4)

    monkeypatch.setattr(SequenceReader, "__call__", stuck)
    t0 = time.perf_counter()
    status, body = call(
        local, "candidates", CandidatesRequest(user_id=1, k=5, recent_item_ids=[world.popular[0]])
    )
    assert time.perf_counter() - t0 < 3.0
    assert status == 200 and body["fallback"] == "feature_store_unavailable"
    assert ids_of(body) == world.popular[1:6], "popular items, the recent click excluded"
    assert any("timed out" in w for w in body["warnings"])
    # the stuck read holds the sqlite store's lock until it returns (serving/online.py): let it finish
    # before the next test reads
    time.sleep(max(0.0, 4.5 - (time.perf_counter() - t0)))


def test_feature_store_error_falls_back_and_readyz_says_why(world, local, monkeypatch):
    def down(self, *args, **kwargs):
        raise ConnectionError("redis://10.0.0.1:6379 refused")

    monkeypatch.setattr(SequenceReader, "__call__", down)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, k=3))
    assert (
        status == 200
        and body["fallback"] == "feature_store_unavailable"
        and ids_of(body) == world.popular[:3]
    )
    resp = local.readyz.remote().result()
    assert resp.status_code == 503 and json.loads(resp.body)["reasons"] == ["feature store: ConnectionError"]


def test_index_down_is_a_json_503(world, local, monkeypatch):
    def broken(self, x, k, queries):
        raise RuntimeError("secret /internal/path")

    monkeypatch.setattr(index.search.EdgeIndex, "_search", broken)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, k=5))
    assert status == 503 and body["error"] == "index_unavailable"
    assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    status, body = call(local, "candidates", CandidatesRequest(user_id=UNKNOWN_USER, k=5))
    assert status == 200 and body["fallback"] == "unknown_user", "popular items need no index"
    resp = local.readyz.remote().result()
    assert resp.status_code == 503 and json.loads(resp.body)["reasons"] == ["index: RuntimeError"]

    def slow(self, x, k, queries):
        time.sleep(4)

    monkeypatch.setattr(index.search.EdgeIndex, "_search", slow)
    t0 = time.perf_counter()
    status, body = call(local, "candidates_batch", BatchRequest(requests=[CandidatesRequest(user_id=2)]))
    assert status == 503 and "timed out" in body["message"] and time.perf_counter() - t0 < 3.0


def test_slow_index_costs_only_the_producers_that_search_it(local):
    """Every index search 3 s slower for 3 s while a client loop calls: student 503s within its search
    timeout (1 s here), popular and clicks (no search) and /healthz never wait for a search, all normal
    again once the searches begun during the fault end (benchmarks/faults.py runs the same with the
    shipped timeouts for the fault table). The bounds are the fault's own delay, not a latency: a call
    that waited for a search takes at least that long, whatever the machine's load."""
    from benchmarks.faults import ClientLoop, local_sender, run_fault, slow_index

    delay_ms = 3000.0
    with ClientLoop(local_sender(local)) as loop:
        table = run_fault(loop, slow_index(delay_ms / 1e3), 3.0, 1.0, 5.0)
    for name in ("healthz", "popular", "events"):
        assert table[name]["errors"] == 0 and table[name]["max_ms"] < delay_ms, (name, table[name])
    assert table["popular"]["fallbacks"] == 0
    student = table["student"]
    assert set(student["statuses"]) <= {"200", "503"} and "503" in student["statuses"], student
    assert student["max_ms"] < delay_ms, student  # search_timeout_s 1 s, never the slow search
    assert student["recover_s"] is not None and student["recover_s"] < delay_ms / 1e3 + 1.0, student


def test_internal_error_is_a_json_500_without_internals(local, monkeypatch):
    def boom(self, ids):
        raise RuntimeError("secret /internal/path")

    monkeypatch.setattr(ModelSource, "user_vectors", boom)
    status, body = call(local, "candidates", CandidatesRequest(user_id=1))
    assert status == 500 and body == {
        "error": "internal_error",
        "message": "internal error; the replica log has the details",
    }


def test_mix_drops_a_slow_and_a_failing_producer_but_answers(world, local, monkeypatch):
    """sasrec stuck past the budget, similar's index down: both dropped and named, their slots refilled
    by the others, within the budget."""
    real = ModelSource.user_vectors

    def slow_sasrec(self, ids):
        if self.name == "sasrec":
            time.sleep(5)
        return real(self, ids)

    def broken(*args):
        raise ConnectionError("qdrant at 10.0.0.9 refused")

    monkeypatch.setattr(ModelSource, "user_vectors", slow_sasrec)
    monkeypatch.setattr(SimilarSource, "last_clicks", broken)  # fails before any wait
    quotas = {"student": 3, "sasrec": 3, "similar": 2, "popular": 2}
    t0 = time.perf_counter()
    # a budget this box meets even when busy; the stuck producer would take 5 s
    status, body = call(local, "mix", MixRequest(user_id=1, quotas=quotas, budget_ms=1500))
    assert time.perf_counter() - t0 < 4.0, "the budget bounds the call"
    assert status == 200 and body["k"] == 10
    reports = body["producers"]
    assert reports["sasrec"]["status"] == "timeout" and reports["similar"]["status"] == "error"
    assert any(w.startswith("sasrec: no answer within the 1500 ms budget") for w in body["warnings"])
    assert any(w.startswith("similar: failed (ConnectionError)") for w in body["warnings"])
    assert "10.0.0.9" not in json.dumps(body)
    ids = [c["item_id"] for c in body["candidates"]]
    assert len(ids) == len(set(ids)) == 10 and {c["producer"] for c in body["candidates"]} == {
        "student",
        "popular",
    }
    assert reports["student"]["taken"] + reports["popular"]["taken"] == 10


def test_local_event_on_unknown_item_is_refused(local):
    from fastapi.exceptions import RequestValidationError

    with pytest.raises(RequestValidationError, match="unknown item_id"):
        local.events.remote(EventRequest(user_id=1, item_id=99999)).result()


def test_push_errors_are_503_retry_only_when_retrying_can_help(local, monkeypatch):
    """Issue 16: every push error was a 503 saying "retry", also a permanent one."""
    import sqlite3

    from serving.events import ClickRows

    def locked(self, *args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(ClickRows, "write", locked)
    resp = local.events.remote(EventRequest(user_id=5, item_id=FIRST_ID)).result()
    body = json.loads(resp.body)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1" and "retry" in body["message"]

    def broken(self, *args, **kwargs):
        raise ValueError("Out of bounds nanosecond timestamp")

    monkeypatch.setattr(ClickRows, "write", broken)
    resp = local.events.remote(EventRequest(user_id=5, item_id=FIRST_ID)).result()
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"] == "internal_error" and "retry" not in body["message"]
    assert "retry-after" not in resp.headers


def test_reconfigure_hot_swaps_in_place_and_refuses_a_bad_config(world, local, tmp_path):
    """reconfigure() on the running replica (what a user_config-only update of a declarative config or a
    RayService does): a new state is built, then swapped in; a bad config leaves the old one serving."""
    from threadpoolctl import threadpool_info

    def blas() -> set[int]:  # the local replica runs in this process
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    assert blas() == {1}  # the default: one BLAS thread (process-wide, unlike torch's per-thread count)
    new = replace(local_config(world), producer="popular", default_k=3, blas_threads=2)
    local.reconfigure.remote(new.to_dict()).result()
    status, body = call(local, "candidates", CandidatesRequest(user_id=1))
    assert status == 200 and body["producer"] == "popular" and len(body["candidates"]) == 3
    assert blas() == {2}
    with pytest.raises(ValueError, match="blas_threads must be in 1..256"):
        replace(new, blas_threads=0)

    export = tmp_path / "export"
    shutil.copytree(world.export, export)
    (export / "run.json").write_text(json.dumps({"teacher_id": "another:teacher"}))
    # the default producer must load: not applied, and said; the replica does not raise (Serve would replace
    # it by one with the bad config) and serves on with the config before
    local.reconfigure.remote(replace(local_config(world), model_path=str(export)).to_dict()).result()
    assert "teacher mismatch" in local.update_error.remote().result()
    assert call(local, "candidates", CandidatesRequest(user_id=1))[1]["producer"] == "popular"
    assert "teacher mismatch" in json.loads(local.readyz.remote().result().body)["update_error"]

    # the same bad export beside a default that loads: the replica serves, the student is named missing
    local.reconfigure.remote(replace(new, model_path=str(export)).to_dict()).result()
    status, body = call(local, "candidates", CandidatesRequest(user_id=1, producer="student"))
    assert status == 503 and body["error"] == "producer_unavailable" and "teacher mismatch" in body["message"]
    ready = local.readyz.remote().result()
    assert ready.status_code == 200
    assert json.loads(ready.body)["producers"]["student"]["ready"] is False
    assert json.loads(ready.body)["update_error"] is None  # applied
    local.reconfigure.remote(local_config(world).to_dict()).result()


# ------------------------------------------------------------------------------ index refresh (HTTP)


def test_upserted_item_reaches_the_replica(world, http):
    """An incremental upsert into the current index version is searched within refresh_interval_s."""
    u = 4
    target = world.exact_top(world.history(u), 1, exclude=world.history(u))[0][0]
    vector = world.item_vectors[world.vocab.index_of([target])[0] - 1]
    new = pd.DataFrame(
        {"item_id": [COLD_ID], "vector": [vector], "teacher_id": TEACHER}
    )  # a twin of the top item
    upsert_items(new, world.ws.items, world.ws, IndexConfig(quantization=False))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = ids_of(http.post("/v1/candidates", json={"user_id": u, "k": 2}).json())
        if COLD_ID in got:
            break
        time.sleep(0.2)
    assert sorted(got) == sorted([target, COLD_ID])


# Last in this module: replayed events move the users' online sequences that the tests above compare with.
def test_replay_streams_held_out_events_through_the_producer_tied_to_their_answers(world, http):
    """Issue 18: `vlmrec replay` asks for candidates, then posts the event with the answer's request_id
    (and the item's position when shown); bounded and stoppable; `vlmrec report` then joins them."""
    from serving.parquet_log import read_log
    from serving.replay import ReplayConfig, held_out_events, replay
    from serving.report import ReportConfig, report
    from vlmrec.schema import EVENTS_LOG

    cfg = ReplayConfig(workdir=str(world.ws.root), url=str(http.base_url), k=10, max_events=100)
    held = held_out_events(world.ws, cfg.split_config(), 100)
    assert len(held) == 9 and held["event_timestamp"].is_monotonic_increasing  # 42 events, 20 % after the cut

    def tied() -> int:  # logged events that name the answer they followed
        return len(read_log(str(world.ws.events_log), EVENTS_LOG)["request_id"].drop_null())

    before = tied()
    summary = replay(cfg)
    assert summary["replayed"] == 9 and summary["outcomes"] == {"events_ok": 9}, summary
    calls = iter([False] * 3 + [True] * 100)
    stopped = replay(cfg, stop=lambda: next(calls))
    assert stopped["replayed"] == 3 and stopped["outcomes"]["stopped_early"] == 1
    deadline = time.monotonic() + 15
    while tied() < before + 12 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tied() - before == 12  # every replayed event, with its answer's request_id
    while True:  # the exposure log's writer flushes on its own clock, beside the event log's
        r = report(ReportConfig(str(world.ws.root), k=10, bootstrap=20))
        if r["events_tied_to_an_exposure"] >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r["events_tied_to_an_exposure"] >= 12  # every replayed event links to its exposure
