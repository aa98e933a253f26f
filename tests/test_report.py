"""`vlmrec report` (serving/report.py) on logs written here: per-arm figures, the SRM test, the files."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from serving.events import LoggedEvent, event_log
from serving.exposures import Exposure, exposure_log
from serving.report import ReportConfig, chi2_sf, main, report, srm_test
from vlmrec import schema
from vlmrec.workspace import Workspace, atomic_write_parquet

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)


def write_logs(ws: Workspace, users_a: int = 200, users_b: int = 200, ctr_a: float = 0.1, ctr_b: float = 0.3):
    """Each user gets one answer of 10 items from their arm; a user clicks the first item with the arm's
    probability (an event tied to the answer), else their next event is an item not shown."""
    rng = np.random.default_rng(0)
    catalogue = np.arange(1, 101)
    items = pd.DataFrame({"item_id": catalogue})
    atomic_write_parquet(pa.Table.from_pandas(items, preserve_index=False), ws.items)
    offline = pd.DataFrame(  # items 1..90 were clicked before; 91..100 are new
        {
            "user_id": 0,
            "item_id": np.arange(1, 91),
            "event_timestamp": T0 - timedelta(days=2),
            "event_type": "click",
        }
    )
    atomic_write_parquet(pa.Table.from_pandas(offline, schema=schema.EVENTS, preserve_index=False), ws.events)
    exposures, events = (
        exposure_log(str(ws.exposures), flush_s=0.01),
        event_log(str(ws.events_log), flush_s=0.01),
    )
    for n, (arm, ctr) in enumerate([("a", ctr_a)] * users_a + [("b", ctr_b)] * users_b):
        user, t = n + 1, T0 + timedelta(seconds=n)
        shown = [int(i) for i in rng.choice(catalogue, 10, replace=False)]
        rid = f"r{user}"
        exposures.record(
            Exposure(
                rid,
                t,
                user,
                "candidates",
                "student",
                f"student-{arm}@x",
                "v1",
                None,
                [(i, k + 1, 1.0 - k / 10, "student") for k, i in enumerate(shown)],
                arm,
            )  # fmt: skip
        )
        if rng.random() < ctr:
            events.record(LoggedEvent(user, shown[0], t + timedelta(seconds=1), "click", rid, 1))
        else:
            unseen = int(next(i for i in catalogue if i not in shown))
            events.record(LoggedEvent(user, unseen, t + timedelta(seconds=1), "click", None, None))
    exposures.close()
    events.close()


def test_per_arm_figures_match_what_was_logged(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    write_logs(ws)
    r = report(ReportConfig(str(ws.root), k=10, bootstrap=200))
    a, b = r["arms"]["a"], r["arms"]["b"]
    assert a["requests"] == a["users"] == 200 and a["impressions"] == 2000
    for arm in (a, b):
        # every click is on the first item shown: CTR per request = hit rate = clicks / requests
        assert arm["ctr_per_request"] == pytest.approx(arm["clicks"] / 200)
        assert arm["hit_rate"] == pytest.approx(arm["clicks"] / 200)
        assert arm["ctr_per_impression"] == pytest.approx(arm["clicks"] / 2000)
        lo, hi = arm["ci95"]["ctr_per_request"]
        assert lo <= arm["ctr_per_request"] <= hi
        assert 0 < arm["cold_share"] < 0.25 and 0.9 < arm["coverage"] <= 1.0  # 10 of 100 items are new
    assert a["ctr_per_request"] < b["ctr_per_request"]
    assert b["ci95"]["ctr_per_request"][0] > a["ci95"]["ctr_per_request"][1]  # 0.1 vs 0.3 on 200 users each
    assert r["srm_p"] > 0.5 and not r["srm_flag"]  # 200 / 200 against equal shares
    assert r["events_tied_to_an_exposure"] == a["clicks"] + b["clicks"]


def test_the_sample_ratio_test_flags_a_broken_split():
    assert srm_test({"a": 500, "b": 500}, {})["p"] == pytest.approx(1.0)
    assert srm_test({"a": 700, "b": 300}, {})["p"] < 1e-30  # 70/30 where 50/50 was configured
    assert srm_test({"a": 700, "b": 300}, {"a": 0.7, "b": 0.3})["p"] == pytest.approx(1.0)
    assert srm_test({"a": 10}, {})["p"] is None  # one arm: nothing to test
    # chi2_sf against known values (scipy.stats.chi2.sf)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(5.991464547107979, 2) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(0.5, 3) == pytest.approx(0.9188914116547, rel=1e-6)
    assert chi2_sf(40.0, 3) == pytest.approx(1.065509033e-08, rel=1e-6)
    assert chi2_sf(0.0, 2) == 1.0 and math.isclose(chi2_sf(1e4, 2), 0.0, abs_tol=1e-300)


def test_the_cli_writes_json_markdown_and_a_plot(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws").ensure()
    write_logs(ws, users_a=300, users_b=100)
    out = tmp_path / "rep" / "ab"
    main(["--workdir", str(ws.root), "--out", str(out), "--bootstrap", "50", "--shares", "a=0.5", "b=0.5"])
    r = json.loads(out.with_suffix(".json").read_text())
    assert set(r["arms"]) == {"a", "b"} and r["srm_flag"] and r["srm_p"] < 1e-3  # 300 / 100 against 50 / 50
    assert "SAMPLE RATIO MISMATCH" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit) as bad:
        main(["--workdir", str(ws.root), "--out", str(out), "--shares", "a=lots"])
    assert bad.value.code == 2 and "--shares" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path / "empty"), "--out", str(out)])
