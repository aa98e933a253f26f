"""The demo page (a Streamlit script): `vlmrec ui` runs it with its UIConfig in VLMREC_UI.

A person picks a user (or starts an anonymous session) and sees: the recent clicks as a strip of images,
each producer's candidates side by side (image, title, category, score), and the Mixer's blended list with
a badge per source producer. Clicking a candidate posts /v1/events; the page then re-runs, so every column
is asked again and reflects the click. Filters (category, available), k, mix weights and the latency of
every call are on the page; a Producer that does not answer gets one clear message.

Elements carry keys (`col-<producer>`, `mixed`, `recent`, `click-<where>-<item>`): the browser test and
AppTest find them by these.
"""

import os
import secrets

import streamlit as st

from ui.catalogue import Catalogue, load_catalogue
from ui.client import ProducerClient, ProducerDown, Reply
from ui.config import UIConfig

ANONYMOUS_BASE = 10**15  # anonymous sessions get a random user id above any catalogue's users
BADGE_COLOURS = {"student": "blue", "sasrec": "orange", "similar": "green", "popular": "violet"}
STRIP = 10  # recent clicks shown
IMAGE_WIDTH = 96


@st.cache_resource
def _client(url: str, timeout_s: float) -> ProducerClient:
    return ProducerClient(url, timeout_s)


@st.cache_data(show_spinner=False)
def _catalogue(workdir: str, images_dir: str | None) -> Catalogue:
    return load_catalogue(workdir, images_dir)


def _click(client: ProducerClient, user_id: int, item_id: int, title: str) -> None:
    """A candidate's button: post the click, keep what happened for the next run to show."""
    try:
        reply = client.event(user_id, item_id)
    except ProducerDown as exc:
        st.session_state.last_click = ("error", str(exc))
        return
    if reply.ok:
        text = f"clicked {title}: sequence now {reply.body['sequence_length']} long ({reply.ms:.0f} ms)"
        st.session_state.last_click = ("ok", text)
    else:
        st.session_state.last_click = ("error", f"the click was not stored: {reply.message}")


def _new_session() -> None:
    st.session_state.anonymous = ANONYMOUS_BASE + secrets.randbelow(10**12)


def _sidebar(
    cat: Catalogue, cfg: UIConfig, offered: dict[str, bool]
) -> tuple[int, int, dict | None, list[str], dict[str, float]]:
    with st.sidebar:
        st.header("vlmrec producers")
        st.caption(f"Producer API: {cfg.api_url}")
        who = st.radio("who", ["a known user", "an anonymous session"], key="who")
        if who == "a known user" and cat.users:
            user = int(st.selectbox("user (most active first)", cat.users[:500], key="user"))
        else:
            if st.session_state.get("anonymous") is None:
                _new_session()
            st.button("new anonymous session", key="new-session", on_click=_new_session)
            user = int(st.session_state.anonymous)
            st.caption(f"anonymous user id {user}")
        k = int(st.slider("k (candidates per producer)", 1, 30, cfg.k, key="k"))
        category = st.selectbox("category", ["(any)", *cat.categories], key="category")
        available = st.selectbox(
            "available", ["(any)", "available only", "unavailable only"], key="available"
        )
        # the Producer's own list (/readyz): a producer that is not ready shows its column's message
        producers = st.multiselect("producers", list(offered), default=list(offered), key="producers")
        st.subheader("mix weights")
        weights = {p: float(st.slider(p, 0.0, 5.0, 1.0, 0.5, key=f"weight-{p}")) for p in producers}
    filters = {}
    if category != "(any)":
        filters["category"] = category
    if available != "(any)":
        filters["available"] = available == "available only"
    return user, k, filters or None, producers, weights


def _card(cat: Catalogue, client: ProducerClient, user: int, item: int, where: str, line: str) -> None:
    """One candidate: image, title, a line (category, score or badges), the click button."""
    image = cat.image(item)
    if image:
        st.image(image, width=IMAGE_WIDTH)
    else:
        st.caption("(no image)")
    title = cat.title(item)
    st.markdown(f"**{title}**  \n{line}")
    st.button(
        "click",
        key=f"click-{where}-{item}",
        on_click=_click,
        args=(client, user, item, title),
        type="tertiary",
    )


def _new(cat: Catalogue, item: int) -> str:
    """A badge for an item added in the last NEW_DAYS before the data's last event: a launch."""
    days = cat.new_days(item)
    return "" if days is None else f" :red-badge[new · {days:.0f} d]"


def _latency(reply: Reply) -> str:
    server = reply.body.get("timings_ms", {}).get("total")
    return f"{reply.ms:.0f} ms" + (f" (server {server:.1f} ms)" if server is not None else "")


def _recent(cat: Catalogue, reply: Reply) -> None:
    with st.container(key="recent"):
        if not reply.ok:
            st.warning(f"recent clicks: {reply.message}")
            return
        items = reply.body["item_ids"][-STRIP:][::-1]  # most recent first
        st.subheader(f"Recent clicks ({len(reply.body['item_ids'])} stored, {_latency(reply)})")
        if not items:
            st.caption("no clicks yet: click a candidate below")
            return
        for col, item in zip(st.columns(STRIP), items, strict=False):
            with col:
                image = cat.image(item)
                if image:
                    st.image(image, width=IMAGE_WIDTH)
                st.caption(cat.title(item))


def _column(cat, client, user, producer, k, filters) -> None:
    with st.container(key=f"col-{producer}", border=True):
        reply = client.candidates(user, producer, k, filters)
        st.markdown(f":{BADGE_COLOURS[producer]}-badge[{producer}] {_latency(reply)}")
        if not reply.ok:
            st.warning(f"{producer}: {reply.message}")
            return
        body = reply.body
        if body["fallback"]:
            st.caption(f"fallback: {body['fallback']}")
        for c in body["candidates"]:
            line = f"{cat.category(c['item_id'])} · {c['score']:.3f}{_new(cat, c['item_id'])}"
            _card(cat, client, user, c["item_id"], producer, line)


def _mixed(cat, client, user, k, weights, filters) -> None:
    with st.container(key="mixed"):
        if not any(w > 0 for w in weights.values()):
            st.info("every mix weight is 0: nothing to blend")
            return
        reply = client.mix(user, k, weights, filters)
        st.subheader(f"Mixed ({_latency(reply)})")
        if not reply.ok:
            st.warning(f"mix: {reply.message}")
            return
        for w in reply.body["warnings"]:
            st.caption(f"warning: {w}")
        per_row = 6
        items = reply.body["candidates"]
        for start in range(0, len(items), per_row):
            for col, c in zip(st.columns(per_row), items[start : start + per_row], strict=False):
                with col:
                    badges = " ".join(
                        f":{BADGE_COLOURS.get(p, 'gray')}-badge[{p} #{c['ranks'][p]}]" for p in c["sources"]
                    )
                    line = f"{cat.category(c['item_id'])}{_new(cat, c['item_id'])}  \n{badges}"
                    _card(cat, client, user, c["item_id"], "mix", line)


def main() -> None:
    cfg = UIConfig.from_env(os.environ)  # the edge: read once
    st.set_page_config(page_title="vlmrec: producers side by side", layout="wide")
    client = _client(cfg.api_url, cfg.timeout_s)
    try:
        cat = _catalogue(cfg.workdir, cfg.images_dir)
    except FileNotFoundError as exc:
        st.error(str(exc))
        st.stop()
        return
    try:
        ready = client.readyz()
    except ProducerDown as exc:
        st.error(str(exc))
        st.stop()
        return
    # the producers this deployment offers, as it says (an experiment's arms, "arm:<name>", are not asked by name)
    offered = {n: p["ready"] for n, p in ready.body.get("producers", {}).items() if ":" not in n}
    user, k, filters, producers, weights = _sidebar(cat, cfg, offered)
    with st.sidebar:
        st.subheader(f"readiness ({_latency(ready)})")
        for name, p in ready.body.get("producers", {}).items():
            state = "ready" if p["ready"] else "NOT READY"
            st.caption(f"{name} {state}: {p.get('model_version') or p.get('reason')}")
    st.title(f"User {user}")
    last = st.session_state.pop("last_click", None)
    if last:
        (st.success if last[0] == "ok" else st.error)(last[1])
    try:
        _recent(cat, client.clicks(user))
        if producers:
            for col, producer in zip(st.columns(len(producers)), producers, strict=True):
                with col:
                    _column(cat, client, user, producer, k, filters)
        _mixed(cat, client, user, k, weights, filters)
    except ProducerDown as exc:
        st.error(str(exc))


main()
