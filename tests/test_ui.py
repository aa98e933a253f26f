"""ui/: the demo page as a person uses it.

- Streamlit's AppTest runs the page's script in-process against a stub Producer (a small HTTP server in a
  thread that records what it is asked): rendering, clicks, filters, k, weights, sessions, failures.
- One end-to-end test starts the real Producer (Ray Serve, tests/producer_world.py) and the page
  (`vlmrec ui`'s start) on 127.0.0.1, opens it in headless Chromium, checks the columns and their images,
  clicks a candidate and watches the columns change.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from serving.config import PRODUCERS
from serving.mixer import interleave, resolve_quotas
from tests.producer_world import free_port
from ui.config import ENV, UIConfig
from vlmrec import schema
from vlmrec.workspace import Workspace, atomic_write_parquet

PAGE = str(Path(__file__).resolve().parent.parent / "ui" / "page.py")
ITEMS = list(range(1, 31))
CLICKS = {1: [3, 7, 11, 4, 9], 2: [5, 6, 8], 3: [2, 12]}  # users by activity: 1, 2, 3


def cat_of(i: int) -> str:
    return "a" if i % 2 else "b"


@pytest.fixture(scope="module")
def ui_world(tmp_path_factory) -> Path:
    """A catalogue of 30 items with PNGs and the events of three users."""
    root = tmp_path_factory.mktemp("ui")
    ws = Workspace(root / "ws").ensure()
    (root / "images").mkdir()
    for i in ITEMS:
        Image.new("RGB", (16, 16), (8 * i, 100, 50)).save(root / "images" / f"{i}.png")
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    items = pd.DataFrame(
        {
            "item_id": ITEMS,
            "title": [f"Item number {i}" for i in ITEMS],
            "text": "",
            "category": [cat_of(i) for i in ITEMS],
            "image_uri": [str(root / "images" / f"{i}.png") if i != 30 else None for i in ITEMS],
            "created_at": [t0 - pd.Timedelta(days=10 * i) for i in ITEMS],  # items 1 and 2: under 30 days old
            "event_timestamp": t0,
        }
    )
    atomic_write_parquet(pa.Table.from_pandas(items, schema=schema.ITEMS, preserve_index=False), ws.items)
    rows = [
        (u, i, t0 + pd.Timedelta(minutes=n), "click") for u, seq in CLICKS.items() for n, i in enumerate(seq)
    ]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp", "event_type"])
    atomic_write_parquet(pa.Table.from_pandas(events, schema=schema.EVENTS, preserve_index=False), ws.events)
    return ws.root


class Stub:
    """A stand-in Producer: deterministic rankings per producer (a fixed permutation, the user's clicks
    excluded, filters applied), clicks appended by /v1/events, the Mixer's real arithmetic; every request
    recorded. `down` makes a producer answer 503."""

    def __init__(self) -> None:
        self.clicks = {u: list(s) for u, s in CLICKS.items()}
        self.requests: list[tuple[str, dict]] = []
        self.down: set[str] = set()
        self.offered: tuple[str, ...] = PRODUCERS  # what /readyz lists
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub.requests.append((self.path, {}))
                if self.path == "/readyz":
                    producers = {
                        p: {"ready": p not in stub.down, "model_version": f"{p}@stub"} for p in stub.offered
                    }
                    return self._send(200, {"ready": True, "producers": producers})
                m = re.fullmatch(r"/v1/users/(\d+)/clicks", self.path)
                if m:
                    u = int(m.group(1))
                    return self._send(200, {"user_id": u, "item_ids": stub.clicks.get(u, [])})
                self._send(404, {"error": "not_found", "message": self.path})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                stub.requests.append((self.path, body))
                if self.path == "/v1/candidates":
                    p = body["producer"]
                    if p in stub.down:
                        return self._send(503, {"error": "producer_unavailable", "message": f"{p} is down"})
                    hits = stub.rank(p, body["user_id"], body["k"], body.get("filters"))
                    cands = [{"item_id": i, "score": s, "rank": r} for r, (i, s) in enumerate(hits, 1)]
                    return self._send(
                        200,
                        {"producer": p, "candidates": cands, "fallback": None, "timings_ms": {"total": 1.5}},
                    )
                if self.path == "/v1/mix":
                    k, quotas = resolve_quotas(body["k"], None, body["weights"], 10, 1000)
                    lists = {p: stub.rank(p, body["user_id"], k, body.get("filters")) for p in quotas}
                    items, _ = interleave(lists, quotas, k)
                    return self._send(200, {"k": k, "candidates": items, "warnings": [], "timings_ms": {}})
                if self.path == "/v1/events":
                    seq = stub.clicks.setdefault(body["user_id"], [])
                    seq.append(body["item_id"])
                    out = {**body, "sequence_length": len(seq), "sequence_len_max": 50}
                    return self._send(200, out)
                self._send(404, {"error": "not_found", "message": self.path})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rank(self, producer: str, user: int, k: int, filters: dict | None) -> list[tuple[int, float]]:
        order = np.random.default_rng(PRODUCERS.index(producer)).permutation(ITEMS).tolist()
        seen = set(self.clicks.get(user, []))
        keep = [
            i
            for i in order
            if i not in seen and (not filters or cat_of(i) == filters.get("category", cat_of(i)))
        ]
        return [(int(i), 1.0 - r / 100) for r, i in enumerate(keep[:k])]

    def asked(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path]


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.server.shutdown()


def app(monkeypatch, ui_world: Path, url: str, **kw):
    from streamlit.testing.v1 import AppTest

    cfg = UIConfig(api_url=url, workdir=str(ui_world), **kw)
    monkeypatch.setenv(ENV, cfg.to_json())
    return AppTest.from_file(PAGE, default_timeout=30)


def titles(at, key: str) -> list[str]:
    """The bold titles inside the keyed container, in page order."""
    found = re.findall(r"\*\*(.+?)\*\*", "\n".join(m.value for m in at.get_by_key(key).markdown))
    return found


def ids_in(at, key: str) -> list[int]:
    return [int(t.rsplit(" ", 1)[1]) for t in titles(at, key)]


def test_page_shows_clicks_every_producer_and_the_mix(monkeypatch, ui_world, stub):
    at = app(monkeypatch, ui_world, stub.url).run()
    assert not at.exception and not at.error
    assert at.title[0].value == "User 1", "the most active user first"
    for p in PRODUCERS:
        assert ids_in(at, f"col-{p}") == [i for i, _ in stub.rank(p, 1, 10, None)], p
    mixed = stub.asked("/v1/mix")[-1]
    assert mixed["k"] == 10 and mixed["weights"] == dict.fromkeys(PRODUCERS, 1.0)
    assert len(ids_in(at, "mixed")) == 10 and len(set(ids_in(at, "mixed"))) == 10
    badges = "\n".join(m.value for m in at.get_by_key("mixed").markdown)
    assert ":blue-badge[student #1]" in badges
    recent = [c.value for c in at.get_by_key("recent").caption]
    assert recent == [f"Item number {i}" for i in reversed(CLICKS[1])], "most recent click first"
    assert len(at.get_by_key("recent").image) == 5
    student = at.get_by_key("col-student")
    assert 30 in ids_in(at, "col-student"), "item 30 has no image: the column shows a placeholder"
    assert len(student.image) == 9 and "(no image)" in [c.value for c in student.caption]
    latency = [m.value for m in at.get_by_key("col-similar").markdown][0]
    assert re.search(r"\d+ ms \(server 1\.5 ms\)", latency)
    # a launch (added under 30 days before the data's last event) carries a "new" badge, nothing else does
    badged = 0
    for p in PRODUCERS:
        cards = [m.value for m in at.get_by_key(f"col-{p}").markdown][1:]
        for item, card in zip(ids_in(at, f"col-{p}"), cards, strict=True):
            assert ("new · " in card) == (item in (1, 2)), (p, item, card)
            badged += "new · " in card
    assert badged, "no launched item among the candidates: the check above saw only old items"


def test_clicking_a_candidate_posts_it_and_every_column_refreshes(monkeypatch, ui_world, stub):
    at = app(monkeypatch, ui_world, stub.url).run()
    before = {p: ids_in(at, f"col-{p}") for p in PRODUCERS}
    item = before["similar"][0]
    n_asked = len(stub.asked("/v1/candidates"))
    at.button(key=f"click-similar-{item}").click().run()
    assert stub.asked("/v1/events") == [{"user_id": 1, "item_id": item}]
    assert len(stub.asked("/v1/candidates")) == n_asked + len(PRODUCERS), "every column asked again"
    assert f"clicked Item number {item}" in at.success[0].value
    assert at.get_by_key("recent").caption[0].value == f"Item number {item}"
    for p in PRODUCERS:
        after = ids_in(at, f"col-{p}")
        assert item not in after and after == [i for i, _ in stub.rank(p, 1, 10, None)], p
    assert item not in ids_in(at, "mixed")


def test_filters_k_and_weights_reach_the_api(monkeypatch, ui_world, stub):
    at = app(monkeypatch, ui_world, stub.url).run()
    at.slider(key="k").set_value(3).run()
    at.selectbox(key="category").select("b").run()
    at.selectbox(key="available").select("available only").run()
    at.slider(key="weight-popular").set_value(0.0).run()
    last = stub.asked("/v1/candidates")[-1]
    assert last["k"] == 3 and last["filters"] == {"category": "b", "available": True}
    assert stub.asked("/v1/mix")[-1]["weights"]["popular"] == 0.0
    assert all(i % 2 == 0 for i in ids_in(at, "col-student")) and len(ids_in(at, "col-student")) == 3
    at.multiselect(key="producers").set_value(["sasrec", "popular"]).run()
    with pytest.raises(KeyError):
        at.get_by_key("col-student")
    assert ids_in(at, "col-popular") and ids_in(at, "col-sasrec")


def test_anonymous_session_starts_empty_and_learns_from_clicks(monkeypatch, ui_world, stub):
    at = app(monkeypatch, ui_world, stub.url).run()
    at.radio(key="who").set_value("an anonymous session").run()
    user = int(at.title[0].value.split()[-1])
    assert user >= 10**15 and at.get_by_key("recent").caption[0].value.startswith("no clicks yet")
    item = ids_in(at, "col-student")[0]
    at.button(key=f"click-student-{item}").click().run()
    assert stub.asked("/v1/events")[-1] == {"user_id": user, "item_id": item}
    assert at.get_by_key("recent").caption[0].value == f"Item number {item}"
    at.button(key="new-session").click().run()
    assert int(at.title[0].value.split()[-1]) != user


def test_producer_down_is_one_clear_message(monkeypatch, ui_world):
    at = app(monkeypatch, ui_world, f"http://127.0.0.1:{free_port()}").run()
    assert not at.exception and len(at.error) == 1
    assert "is not answering" in at.error[0].value and "vlmrec serve" in at.error[0].value


def test_one_producer_failing_leaves_the_others(monkeypatch, ui_world, stub):
    stub.down.add("sasrec")
    at = app(monkeypatch, ui_world, stub.url).run()
    assert "sasrec is down" in at.get_by_key("col-sasrec").warning[0].value
    assert len(ids_in(at, "col-student")) == 10 and not at.exception


def test_the_page_offers_the_producers_the_deployment_lists(monkeypatch, ui_world, stub):
    """The producer columns come from the Producer's /readyz, not from a list in the page."""
    stub.offered = ("student", "popular")
    try:
        at = app(monkeypatch, ui_world, stub.url).run()
        assert at.multiselect(key="producers").options == ["student", "popular"] and not at.exception
        assert ids_in(at, "col-student") and ids_in(at, "col-popular")
        with pytest.raises(KeyError):  # no column for a producer the deployment does not offer
            at.get_by_key("col-similar")
    finally:
        stub.offered = PRODUCERS


def test_ui_cli_config_and_bad_input(tmp_path, capsys):
    from vlmrec.cli import build_parser
    from vlmrec.cli import main as cli

    args = build_parser("ui").parse_args(["ui", "--workdir", "w", "--images-dir", "imgs", "--port", "8600"])
    from ui.cli import command, config_from_args

    cfg = config_from_args(args)
    assert cfg.workdir == str(Path("w").absolute()) and cfg.images_dir == str(Path("imgs").absolute())
    assert cfg.page_url == "http://127.0.0.1:8600" and UIConfig.from_env({ENV: cfg.to_json()}) == cfg
    assert "--server.headless" in command(cfg) and cfg.api_url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="unknown keys"):
        UIConfig.from_env({ENV: '{"api": "x"}'})
    with pytest.raises(ValueError, match="api_url"):
        UIConfig(api_url="localhost:8000")
    assert cli(["ui", "--workdir", str(tmp_path / "none")]) == 2
    assert "no catalogue" in capsys.readouterr().err


@pytest.mark.slow
def test_browser_end_to_end(tmp_path, ray_local):
    """The real Producer and the page on 127.0.0.1, in headless Chromium: every column shows its images,
    a click on a candidate changes the columns (the clicked item leaves them, the last-click producers
    move) and enters the recent-clicks strip."""
    from selenium.webdriver.common.by import By

    from serving import cli as serving_cli
    from tests.producer_world import write_world
    from ui import browser
    from ui import cli as ui_cli

    world = write_world(tmp_path)
    k = 4
    api = serving_cli.start(world.config, port=free_port())
    cfg = UIConfig(api_url=api, workdir=str(world.ws.root), k=k, port=free_port(), timeout_s=30)
    page = ui_cli.start(cfg, quiet=True)
    driver = browser.chromium()
    keys = [f"col-{p}" for p in PRODUCERS]
    try:
        browser.wait_for_page(driver, cfg.page_url, [*keys, "mixed"], min_images=k, timeout_s=120)

        def text(key: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, f".st-key-{key}").text

        def shown(key: str) -> list[str]:
            return re.findall(r"item \d+", text(key))

        before = {key: shown(key) for key in keys}
        assert all(len(v) == k for v in before.values()), before
        for key in keys:  # every image in every column loaded
            box = driver.find_element(By.CSS_SELECTOR, f".st-key-{key}")
            assert driver.execute_script(browser.IMAGES_LOADED, box) == k
        item = before["col-student"][0]
        button = driver.find_element(By.CSS_SELECTOR, f".st-key-click-student-{item.split()[1]} button")
        button.click()
        browser.wait(
            driver,
            lambda d: (
                d.execute_script(browser.SCRIPT_DONE)
                and item in text("recent")
                and all(item not in shown(key) for key in keys)
            ),
            timeout_s=60,
        )
        moved = ("col-student", "col-sasrec", "col-similar")  # they rank from the last clicks
        browser.wait(driver, lambda d: all(shown(key) != before[key] for key in moved), timeout_s=60)
        assert f"clicked {item}" in driver.find_element(By.CSS_SELECTOR, "[data-testid='stAlert']").text
    finally:
        driver.quit()
        ui_cli.stop(page)
        serving_cli.stop()
