"""Dynamic batching (serving/pipeline.py): concurrent single requests answered by one feature read, one forward
and one batched search per producer, each caller getting exactly its own answer.

The Coalescer alone (plain asyncio), then the real Pipeline over the tiny world (every producer loaded, no
Ray): a coalesced batch of different users, k, filters and producers equals the unbatched answers, and a
caller that gives up does not poison the others. tests/test_serving.py's HTTP tests go through the same path
in a real Serve deployment (batch_size in each response)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from serving.api import CandidatesRequest
from serving.calls import Deps, NoMetrics, Pools
from serving.pipeline import Coalescer, Pipeline
from serving.state import State, load_state
from tests.producer_world import FIRST_ID, UNKNOWN_USER, World, write_world
from vlmrec.lease import Current

# ------------------------------------------------------------------------------------------ Coalescer


class Recorder:
    """A batched function that records its batches; `gate` holds a batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return [i * 10 for i in items]


def test_concurrent_calls_form_one_batch_behind_a_running_one_and_each_gets_its_own_answer():
    async def main():
        run = Recorder()
        run.gate = asyncio.Event()
        co = Coalescer(run, max_batch=8, max_wait_s=10.0)
        first = asyncio.ensure_future(co.submit(1))  # nothing running: leaves at once
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(co.submit(i)) for i in range(2, 7)]  # wait behind the first
        await asyncio.sleep(0.01)
        assert run.batches == [[1]]
        run.gate.set()
        assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
        assert run.batches == [[1], [2, 3, 4, 5, 6]]  # the five waited for the first, then went together

    asyncio.run(main())


def test_a_full_batch_leaves_at_once_and_the_wait_is_bounded():
    async def main():
        run = Recorder()
        run.gate = asyncio.Event()
        co = Coalescer(run, max_batch=3, max_wait_s=0.05)
        held = asyncio.ensure_future(co.submit(0))  # a batch that never finishes by itself
        await asyncio.sleep(0)
        full = [asyncio.ensure_future(co.submit(i)) for i in (1, 2, 3)]  # max_batch: no waiting
        await asyncio.sleep(0.01)
        assert run.batches == [[0], [1, 2, 3]]
        late = asyncio.ensure_future(co.submit(4))
        await asyncio.sleep(0.01)
        assert run.batches == [[0], [1, 2, 3]]  # waits behind the running batches...
        await asyncio.sleep(0.1)
        assert run.batches == [[0], [1, 2, 3], [4]]  # ...at most max_wait_s
        run.gate.set()
        assert await asyncio.gather(held, *full, late) == [0, 10, 20, 30, 40]

    asyncio.run(main())


def test_a_call_waits_only_behind_a_running_batch_of_its_own_key():
    """One producer's batch held up (its index slow) holds no other producer's call: a call of another key
    leaves at once and takes the waiting calls of every key along; a call of the held key waits."""

    async def main():
        run = Recorder()
        run.gate = asyncio.Event()
        co = Coalescer(run, max_batch=8, max_wait_s=10.0, key=lambda i: "odd" if i % 2 else "even")
        held = asyncio.ensure_future(co.submit(1))  # an "odd" batch that does not finish by itself
        await asyncio.sleep(0)
        same = asyncio.ensure_future(co.submit(3))
        await asyncio.sleep(0.01)
        assert run.batches == [[1]]  # 3 waits behind the running odd batch
        run.gate = None  # the batches from here on finish at once
        other = await asyncio.wait_for(co.submit(2), 1.0)  # even: nothing of its own runs
        assert other == 20 and run.batches == [[1], [3, 2]]  # it left at once, 3 along with it
        assert await same == 30 and not held.done()

    asyncio.run(main())


def test_a_caller_that_gives_up_or_fails_does_not_poison_the_batch():
    async def main():
        run = Recorder()
        run.gate = asyncio.Event()
        co = Coalescer(run, max_batch=8, max_wait_s=10.0)
        blocker = asyncio.ensure_future(co.submit(0))
        await asyncio.sleep(0)
        impatient = asyncio.ensure_future(asyncio.wait_for(co.submit(1), 0.01))
        patient = [asyncio.ensure_future(co.submit(i)) for i in (2, 3)]
        with pytest.raises(TimeoutError):
            await impatient  # gave up while waiting behind the blocker
        run.gate.set()
        assert await blocker == 0 and await asyncio.gather(*patient) == [20, 30]
        assert run.batches[1] == [2, 3]  # the caller that left was not computed for
        # a batch whose function raises: each of its callers gets the error, the next batch is unharmed
        run.gate = asyncio.Event()
        blocker = asyncio.ensure_future(co.submit(0))
        await asyncio.sleep(0)
        bad = asyncio.ensure_future(asyncio.gather(co.submit(-1), co.submit(5), return_exceptions=True))
        await asyncio.sleep(0.01)
        run.gate.set()
        assert await blocker == 0 and all(isinstance(b, ValueError) for b in await bad)
        assert run.batches[-1] == [-1, 5]
        assert await co.submit(7) == 70

    asyncio.run(main())


# ------------------------------------------------------------------------------------------- Pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return write_world(tmp_path_factory.mktemp("coalescing"))


def open_pipeline(config) -> tuple[Pipeline, Current]:
    current = Current(load_state(config), State.close, "model")
    return Pipeline(current, Deps(Pools.create(), NoMetrics()), max_batch=32, max_wait_ms=50.0), current


@pytest.fixture(scope="module")
def pipeline(world):
    """Without the vector cache: every answer here runs its own forward, batched or not."""
    pipe, current = open_pipeline(replace(world.config, vector_cache=0))
    yield pipe
    current.close()


MIXED = [  # different users, k, filters, producers, recent clicks, one unknown user
    CandidatesRequest(user_id=1, k=7),
    CandidatesRequest(user_id=2, k=3, producer="sasrec"),
    CandidatesRequest(user_id=3, k=5, filters={"category": "b"}),
    CandidatesRequest(user_id=UNKNOWN_USER, k=4),
    CandidatesRequest(user_id=1, k=6, producer="similar", exclude_seen=False),
    CandidatesRequest(user_id=4, k=5, producer="popular", filters={"available": True}),
    CandidatesRequest(user_id=2, k=8, recent_item_ids=[FIRST_ID + 3, FIRST_ID + 9]),
    CandidatesRequest(user_id=5, k=2, producer="sasrec", filters={"category": ["a"]}),
]


def strip(answer: dict) -> dict:
    """What a caller is served: the list exactly, scores to float32 noise (a batched forward sums in
    another order), everything but the timings."""
    out = {k: v for k, v in answer.items() if k not in ("timings_ms", "batch_size", "candidates")}
    out["items"] = [(c["item_id"], c["rank"]) for c in answer["candidates"]]
    out["scores"] = [round(c["score"], 4) for c in answer["candidates"]]
    return out


def test_a_coalesced_batch_returns_each_caller_exactly_its_unbatched_answer(pipeline):
    async def main():
        alone = [(await pipeline.answer([r]))[0] for r in MIXED]  # one at a time: batches of 1
        together = await asyncio.gather(*(pipeline.candidates(r) for r in MIXED))
        return alone, together

    alone, together = asyncio.run(main())
    assert all(a["batch_size"] == 1 for a in alone)
    assert max(t["batch_size"] for t in together) > 1, "concurrent requests were coalesced"
    for req, a, t in zip(MIXED, alone, together, strict=True):
        assert strip(t) == strip(a), req
        assert len(t["candidates"]) <= req.k


def test_the_batch_endpoint_path_equals_single_answers(pipeline):
    async def main():
        return await pipeline.answer(MIXED), [(await pipeline.answer([r]))[0] for r in MIXED]

    batch, alone = asyncio.run(main())
    assert [strip(b) for b in batch] == [strip(a) for a in alone]
    assert all(b["batch_size"] == len(MIXED) for b in batch)


def test_a_caller_that_times_out_leaves_the_others_their_answers(pipeline, monkeypatch):
    from serving.sources import ModelSource

    real = ModelSource.user_vectors

    def slow(self, ids):
        import time

        time.sleep(0.3)
        return real(self, ids)

    monkeypatch.setattr(ModelSource, "user_vectors", slow)

    async def main():
        first = asyncio.ensure_future(pipeline.candidates(MIXED[0]))  # runs the slow forward
        await asyncio.sleep(0.01)
        impatient = asyncio.ensure_future(asyncio.wait_for(pipeline.candidates(MIXED[2]), 0.05))
        others = [asyncio.ensure_future(pipeline.candidates(r)) for r in MIXED[4:7]]
        results = await asyncio.gather(first, impatient, *others, return_exceptions=True)
        return results

    first, impatient, *others = asyncio.run(main())
    assert isinstance(impatient, TimeoutError)
    monkeypatch.setattr(ModelSource, "user_vectors", real)

    async def alone():
        return [(await pipeline.answer([r]))[0] for r in (MIXED[0], *MIXED[4:7])]

    want = asyncio.run(alone())
    assert [strip(x) for x in (first, *others)] == [strip(w) for w in want]


def test_a_producer_that_fails_fails_only_its_own_callers_in_a_batch(pipeline, monkeypatch):
    from serving.sources import SimilarSource

    async def broken(self, deps, cfg, ask, rows):
        raise RuntimeError("a bug in similar")

    monkeypatch.setattr(SimilarSource, "rank", broken)

    async def main():
        return await asyncio.gather(*(pipeline.candidates(r) for r in MIXED), return_exceptions=True)

    results = asyncio.run(main())
    assert max(r["batch_size"] for r in results if isinstance(r, dict)) > 1
    for req, r in zip(MIXED, results, strict=True):
        if req.producer == "similar":
            assert isinstance(r, RuntimeError)
        else:
            assert isinstance(r, dict) and r["producer"] == (req.producer or "student"), (req, r)
    with pytest.raises(RuntimeError):  # the :batch path (and the Mixer) still see the error
        asyncio.run(pipeline.answer(MIXED))


def test_the_vector_cache_serves_exactly_what_the_forward_does_and_a_new_click_misses_it(world, pipeline):
    cached, current = open_pipeline(replace(world.config, vector_cache=100))
    try:
        with cached.lease() as s:
            student, sasrec = s.sources["student"], s.sources["sasrec"]

        async def main():
            first = await cached.answer(MIXED)
            second = await asyncio.gather(*(cached.candidates(r) for r in MIXED))
            return first, second, [(await pipeline.answer([r]))[0] for r in MIXED]

        first, second, uncached = asyncio.run(main())
        want = [strip(u) for u in uncached]
        assert [strip(a) for a in first] == want and [strip(a) for a in second] == want
        # the model rows of MIXED: student for users 1, 3, 2 (+ recent clicks) and sasrec for 2, 5; the
        # unknown user has no input. The first call computed each once, the second found every one.
        assert (student.cache.misses, student.cache.hits) == (3, 3)
        assert (sasrec.cache.misses, sasrec.cache.hits) == (2, 2)

        clicked = CandidatesRequest(user_id=1, k=7, recent_item_ids=[FIRST_ID + 11])  # a click since
        [fresh] = asyncio.run(cached.answer([clicked]))
        [fresh_uncached] = asyncio.run(pipeline.answer([clicked]))
        assert student.cache.misses == 4 and strip(fresh) == strip(fresh_uncached)
        assert strip(fresh) != strip(first[0])  # the new click moved the user: not the cached answer
    finally:
        current.close()
