"""`vlmrec report`: what each experiment arm served and what users did next, from the Producer's logs.

    vlmrec report --workdir W --out reports/ab --shares control=0.5 v2=0.5 --k 10
    # -> reports/ab.json, reports/ab.md, reports/ab.png

Joins the exposure log (serving/exposures.py: one record per answer) and the event log (serving/events.py:
every accepted /v1/events, with the request_id and position of the answer it followed), per arm:
- requests, users, impressions (items shown);
- CTR: clicks on an answer of the arm (events naming its request_id and a position in it) per impression
  and per request;
- hit rate@k: the share of answers whose user's next event (the first one after the answer, of any type)
  is one of the answer's first k items;
- coverage: distinct items served / catalogue items; cold share: served items with no event before the
  answer in data/events.parquet (new or never clicked);
- 95% intervals by bootstrap over users (each user's answers and clicks resampled together);
- a sample-ratio-mismatch test: chi-square of users per arm against the configured shares (equal shares
  when none are given); a small p (< 0.001) says the split is broken, and the figures should not be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from serving.exposures import read_exposures
from serving.parquet_log import read_log
from vlmrec.schema import EVENTS_LOG
from vlmrec.workspace import DEFAULT_WORKDIR, Workspace

NO_ARM = "(none)"  # answers outside any experiment

log = logging.getLogger("serving.report")


@dataclass(frozen=True)
class ReportConfig:
    workdir: str = str(DEFAULT_WORKDIR)
    k: int = 10  # hit rate of the next event in the answer's first k items
    click_types: tuple[str, ...] = ("click",)  # the event types CTR counts
    shares: tuple[tuple[str, float], ...] = ()  # (arm, share) the split should follow; () = equal
    bootstrap: int = 1000
    seed: int = 0


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularised upper incomplete gamma Q(dof/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = dof / 2.0, x / 2.0
    if z < a + 1:  # the series of P, then 1 - P
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= z / (a + n)
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)  # Lentz's continued fraction of Q
    h = d
    for n in range(1, 1000):
        an = -n * (n - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(-z + a * math.log(z) - math.lgamma(a)) * h)


def srm_test(users_per_arm: dict[str, int], shares: dict[str, float]) -> dict:
    """Chi-square goodness of fit of users per arm to the expected shares (normalised over the arms here)."""
    arms = [a for a in users_per_arm if a != NO_ARM]
    if len(arms) < 2:
        return {"chi2": None, "p": None, "expected_shares": {}}
    expected = {a: shares.get(a, 1.0 if not shares else 0.0) for a in arms}
    total_share = sum(expected.values())
    if total_share <= 0:
        raise ValueError(f"--shares covers none of the arms served: {arms}")
    n = sum(users_per_arm[a] for a in arms)
    chi2 = 0.0
    for a in arms:
        e = n * expected[a] / total_share
        if e == 0:
            if users_per_arm[a]:
                return {"chi2": math.inf, "p": 0.0, "expected_shares": expected}
            continue
        chi2 += (users_per_arm[a] - e) ** 2 / e
    return {"chi2": chi2, "p": chi2_sf(chi2, len(arms) - 1), "expected_shares": expected}


def per_answer_table(
    exposures: pd.DataFrame, events: pd.DataFrame, first_seen: pd.Series, cfg: ReportConfig
) -> pd.DataFrame:
    """One row per answer: arm, user, impressions, clicks tied to it, next-event hit, cold items served."""
    exp = exposures.copy()
    exp["arm"] = exp["arm"].fillna(NO_ARM)
    exp["impressions"] = exp["items"].map(len)
    # a click on an answer: an event of a click type naming the answer and a position in it (shown)
    tied = events["request_id"].notna() & events["position"].notna()
    clicks = events[events["event_type"].isin(cfg.click_types) & tied]
    per_request = clicks.groupby("request_id").size()
    exp["clicks"] = exp["request_id"].map(per_request).fillna(0).astype(int)
    # the user's next event after each answer (any type), from the event log
    ev = events.sort_values("event_timestamp")[["user_id", "item_id", "event_timestamp"]]
    exp = exp.sort_values("time")
    nxt = pd.merge_asof(
        exp[["time", "user_id"]].reset_index(),
        ev.rename(columns={"event_timestamp": "time_next", "item_id": "next_item"}),
        left_on="time",
        right_on="time_next",
        by="user_id",
        direction="forward",
        allow_exact_matches=False,
    ).set_index("index")
    exp["next_item"] = nxt["next_item"]
    exp["has_next"] = exp["next_item"].notna()
    exp["hit"] = [
        bool(has) and int(n) in {int(i["item_id"]) for i in items[: cfg.k]}
        for has, n, items in zip(exp["has_next"], exp["next_item"].fillna(-1), exp["items"], strict=True)
    ]
    exp["cold"] = [
        sum(1 for i in items if not (first_seen.get(int(i["item_id"]), pd.NaT) < t))
        for items, t in zip(exp["items"], exp["time"], strict=True)
    ]
    return exp


def _by_user(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.groupby("user_id").agg(
        requests=("request_id", "size"),
        impressions=("impressions", "sum"),
        clicks=("clicks", "sum"),
        with_next=("has_next", "sum"),
        hits=("hit", "sum"),
        cold=("cold", "sum"),
    )


def _figures(u: pd.DataFrame) -> dict[str, float]:
    s = u.sum()
    return {
        "ctr_per_impression": s.clicks / s.impressions if s.impressions else math.nan,
        "ctr_per_request": s.clicks / s.requests if s.requests else math.nan,
        "hit_rate": s.hits / s.with_next if s.with_next else math.nan,
        "cold_share": s.cold / s.impressions if s.impressions else math.nan,
    }


def report(cfg: ReportConfig) -> dict:
    ws = Workspace(cfg.workdir)
    exposures = read_exposures(str(ws.exposures)).to_pandas()
    if exposures.empty:
        raise ValueError(f"no exposures under {ws.exposures}: serve some requests first")
    events = read_log(str(ws.events_log), EVENTS_LOG).to_pandas()
    offline = (
        pq.read_table(ws.events, columns=["item_id", "event_timestamp"]).to_pandas()
        if ws.events.exists()
        else pd.DataFrame(columns=["item_id", "event_timestamp"])
    )
    first_seen = offline.groupby("item_id")["event_timestamp"].min()
    catalogue = pq.read_table(ws.items, columns=["item_id"]).num_rows if ws.items.exists() else 0
    rows = per_answer_table(exposures, events, first_seen, cfg)
    rng = np.random.default_rng(cfg.seed)
    arms: dict[str, dict] = {}
    for arm, part in rows.groupby("arm"):
        users = _by_user(part)
        point = _figures(users)
        draws = {name: [] for name in point}
        values = users.to_numpy()
        for _ in range(cfg.bootstrap):
            sample = pd.DataFrame(values[rng.integers(0, len(values), len(values))], columns=users.columns)
            for name, v in _figures(sample).items():
                draws[name].append(v)
        served = {int(i["item_id"]) for items in part["items"] for i in items}
        arms[str(arm)] = {
            **point,
            "ci95": {
                n: [float(np.nanpercentile(d, 2.5)), float(np.nanpercentile(d, 97.5))]
                for n, d in draws.items()
            },
            "requests": int(len(part)),
            "users": int(len(users)),
            "impressions": int(part["impressions"].sum()),
            "clicks": int(part["clicks"].sum()),
            "answers_with_a_next_event": int(part["has_next"].sum()),
            "coverage": len(served) / catalogue if catalogue else None,
            "producers": sorted(part["producer"].unique().tolist()),
            "model_versions": sorted(part["model_version"].dropna().unique().tolist()),
        }
    srm = srm_test({a: v["users"] for a, v in arms.items()}, dict(cfg.shares))
    tied = events["request_id"].isin(set(exposures["request_id"])).sum() if len(events) else 0
    return {
        "arms": arms,
        "srm": srm,
        "srm_p": srm["p"],
        "srm_flag": srm["p"] is not None and srm["p"] < 1e-3,
        "k": cfg.k,
        "exposures": int(len(exposures)),
        "events": int(len(events)),
        "events_tied_to_an_exposure": int(tied),
        "config": {"k": cfg.k, "click_types": list(cfg.click_types), "shares": dict(cfg.shares)},
    }


def markdown(r: dict) -> str:
    def f(v, ci):
        return (
            "-"
            if v is None or (isinstance(v, float) and math.isnan(v))
            else f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
        )

    lines = [
        f"| arm | requests | users | CTR per impression | CTR per request | hit rate@{r['k']} | cold share | coverage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, a in r["arms"].items():
        ci = a["ci95"]
        cov = "-" if a["coverage"] is None else f"{a['coverage']:.4f}"
        lines.append(
            f"| {arm} | {a['requests']} | {a['users']} | {f(a['ctr_per_impression'], ci['ctr_per_impression'])} | "
            f"{f(a['ctr_per_request'], ci['ctr_per_request'])} | {f(a['hit_rate'], ci['hit_rate'])} | "
            f"{f(a['cold_share'], ci['cold_share'])} | {cov} |"
        )
    srm = r["srm"]
    verdict = (
        "n/a (one arm)"
        if srm["p"] is None
        else f"chi2 {srm['chi2']:.2f}, p = {srm['p']:.4g}"
        + (" **SAMPLE RATIO MISMATCH: the split is broken**" if r["srm_flag"] else " (no mismatch)")
    )
    lines += ["", f"Sample-ratio test: {verdict}. {r['exposures']} exposures, {r['events']} events "
              f"({r['events_tied_to_an_exposure']} tied to an exposure)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(r["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, title in (
        (axes[0], "ctr_per_impression", "CTR per impression"),
        (axes[1], "hit_rate", f"hit rate@{r['k']}"),
    ):
        values = [r["arms"][a][metric] for a in arms]
        lo = [v - r["arms"][a]["ci95"][metric][0] for a, v in zip(arms, values, strict=True)]
        hi = [r["arms"][a]["ci95"][metric][1] - v for a, v in zip(arms, values, strict=True)]
        ax.bar(arms, values, yerr=[lo, hi], capsize=4, color="#4C72B0")
        ax.set_title(title)
    fig.suptitle("per arm, 95% bootstrap intervals over users" + ("  (SRM!)" if r["srm_flag"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default=str(DEFAULT_WORKDIR), help="the workspace (exposures, events log)"
    )
    parser.add_argument("--out", required=True, help="output path without suffix: <out>.json, .md, .png")
    parser.add_argument("--k", type=int, default=10, help="hit rate of the next event in the first k items")
    parser.add_argument("--click-types", nargs="+", default=["click"], help="event types counted as clicks")
    parser.add_argument("--shares", nargs="*", default=[], metavar="ARM=SHARE", help="the split's shares")
    parser.add_argument("--bootstrap", type=int, default=1000)


def _shares(pairs: Sequence[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for p in pairs:
        arm, sep, value = p.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or not arm or not (math.isfinite(share) and share >= 0):
            raise ValueError(f"--shares: ARM=SHARE with a share >= 0, got {p!r}")
        out.append((arm, share))
    return tuple(out)


def run(args: argparse.Namespace) -> dict:
    if args.k < 1 or args.bootstrap < 1:
        raise ValueError("--k and --bootstrap must be >= 1")
    cfg = ReportConfig(args.workdir, args.k, tuple(args.click_types), _shares(args.shares), args.bootstrap)
    r = report(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2, default=float))
    out.with_suffix(".md").write_text(markdown(r))
    try:
        plot(r, out.with_suffix(".png"))
    except ImportError:  # matplotlib comes with vlmrec[train]; a serving image reports without the plot
        log.warning("no plot: matplotlib is not installed (pip install 'vlmrec[train]')")
    print(markdown(r))
    print(f"report: wrote {out.with_suffix('.json')}, .md, .png")
    return r


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
