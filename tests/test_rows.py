"""Row-sparse id tables (engine/rows.py): a step where every row is touched is AdamW's step, rows a batch did
not touch stay where they are, the touched rows' gradients are averaged across ranks, two ranks sharing the
moments step exactly as one rank holding them all, and the moments survive a checkpoint round trip, also
onto another number of ranks."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.rows import RowSparseAdam, all_reduce_rows

N, D = 12, 5
REPO = Path(__file__).resolve().parents[1]


def _two_ranks(case: str, tmp_path: Path) -> dict:
    """Run `case` on two gloo ranks spawned from a fresh interpreter (not from pytest's process, which holds
    the session's Ray: processes spawned beside it broke the Serve tests that came after)."""
    code = f"from tests.test_rows import _spawn; _spawn({case!r}, {str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    return torch.load(tmp_path / "out.pt")


def _spawn(case: str, tmp: str) -> None:
    out = mp.Manager().dict()
    mp.spawn(globals()[case], args=(2, f"file://{tmp}/init", out), nprocs=2)
    torch.save(dict(out), f"{tmp}/out.pt")


def _ds(lr=1e-2, weight_decay=0.0, clip=1.0) -> dict:
    params = {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": weight_decay}
    return {
        "optimizer": {"type": "AdamW", "params": params},
        "gradient_clipping": clip,
        "bf16": {"enabled": False},
    }


def _loss(table: nn.Embedding, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((table(rows) - target) ** 2).sum() * 3.0  # large enough gradients for clipping to bite


@pytest.mark.parametrize(("weight_decay", "clip"), [(0.0, 0.0), (0.1, 1.0)])
def test_a_step_touching_every_row_is_adamws_step(weight_decay, clip):
    torch.manual_seed(0)
    sparse, dense = nn.Embedding(N, D), nn.Embedding(N, D)
    dense.load_state_dict(sparse.state_dict())
    rows = RowSparseAdam([sparse], _ds(weight_decay=weight_decay, clip=clip))
    adamw = torch.optim.AdamW(
        dense.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay
    )
    for _ in range(5):
        index, target = torch.randperm(N).repeat(2), torch.randn(2 * N, D)
        _loss(sparse, index, target).backward()
        rows.step()
        _loss(dense, index, target).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(dense.parameters(), clip)
        adamw.step()
        adamw.zero_grad()
    assert sparse.weight.grad is None  # dropped after the step
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-5, atol=1e-6)


def test_rows_a_batch_does_not_touch_stay_where_they_are():
    torch.manual_seed(0)
    table = nn.Embedding(N, D)
    before = table.weight.detach().clone()
    rows = RowSparseAdam([table], _ds(weight_decay=0.5))
    for _ in range(3):
        _loss(table, torch.tensor([1, 3, 3]), torch.randn(3, D)).backward()
        rows.step()
    moved = (table.weight != before).any(1)
    assert moved.nonzero().flatten().tolist() == [1, 3]
    assert rows.state_dict()["moments"][0][0][[0, 2, 4]].abs().sum() == 0  # no moments for them either


def test_the_moments_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    a = nn.Embedding(N, D)
    b = copy.deepcopy(a)
    opt_a = RowSparseAdam([a], _ds())
    batches = [(torch.randint(0, N, (6,)), torch.randn(6, D)) for _ in range(4)]
    for index, target in batches:
        _loss(a, index, target).backward()
        opt_a.step()
    opt_b = RowSparseAdam([b], _ds())
    for index, target in batches[:2]:
        _loss(b, index, target).backward()
        opt_b.step()
    torch.save({"w": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    b, saved = nn.Embedding(N, D), torch.load(tmp_path / "ckpt.pt")  # a fresh worker
    b.load_state_dict(saved["w"])
    opt_b = RowSparseAdam([b], _ds())
    opt_b.load_state_dicts([saved["opt"]])
    for index, target in batches[2:]:
        _loss(b, index, target).backward()
        opt_b.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def _rank(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(rank)
    table = nn.Embedding(N, D, sparse=True)
    index = torch.tensor([[1, 2, 2], [2, 7, 9, 9, 11]][rank])  # different rows, different counts
    _loss(table, index, torch.randn(len(index), D)).backward()
    reduced = all_reduce_rows(table.weight.grad)
    gathered = [torch.zeros(N, D) for _ in range(world)]
    dist.all_gather(gathered, table.weight.grad.to_dense())
    out[rank] = (reduced.indices()[0].tolist(), reduced.to_dense(), torch.stack(gathered).mean(0))
    dist.destroy_process_group()


def test_two_ranks_average_only_their_touched_rows(tmp_path):
    out = _two_ranks("_rank", tmp_path)
    for rank in range(2):
        rows, reduced, mean_of_dense = out[rank]
        assert rows == [1, 2, 7, 9, 11]  # the union, one entry each
        torch.testing.assert_close(reduced, mean_of_dense)


def _rank_without_rows(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    table = nn.Embedding(N, D)
    with torch.no_grad():
        table.weight.fill_(1.0)
    rows = RowSparseAdam([table], _ds(clip=0.0))
    if rank == 0:  # rank 1's batch never reached the table: it still joins the exchange
        table(torch.tensor([4])).sum().backward()
    rows.step()
    out[rank] = table.weight.detach().clone()
    dist.destroy_process_group()


def test_a_rank_whose_batch_missed_the_table_still_steps_with_the_others(tmp_path):
    out = _two_ranks("_rank_without_rows", tmp_path)
    torch.testing.assert_close(out[0], out[1])  # both applied the same averaged row
    moved = (out[0] != 1.0).any(1)
    assert moved.nonzero().flatten().tolist() == [4]


def test_bf16_tables_are_refused():
    with pytest.raises(ValueError, match="fp32"):
        RowSparseAdam([nn.Embedding(N, D)], {**_ds(), "bf16": {"enabled": True}})


def _batches(steps: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randint(0, N, (2, 5), generator=g), torch.randn(2, 5, D, generator=g)) for _ in range(steps)
    ]


def _one_rank_reference() -> tuple[nn.Embedding, RowSparseAdam]:
    """The table after `_batches()` on one rank holding every moment, each step the mean of the two ranks'."""
    torch.manual_seed(0)
    table = nn.Embedding(N, D)
    rows = RowSparseAdam([table], _ds(weight_decay=0.1))
    for index, target in _batches():
        (_loss(table, index[0], target[0]) + _loss(table, index[1], target[1])).div(2).backward()
        rows.step()
    return table, rows


def _sharded_rank(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial table on both ranks
    table = nn.Embedding(N, D)
    rows = RowSparseAdam([table], _ds(weight_decay=0.1))
    for index, target in _batches():
        _loss(table, index[rank], target[rank]).backward()
        rows.step()
    out[rank] = (table.weight.detach().clone(), rows.state_dict())
    dist.destroy_process_group()


def test_two_ranks_sharing_the_moments_step_as_one_rank_holding_them_all(tmp_path):
    out = _two_ranks("_sharded_rank", tmp_path)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)  # every rank got the owners' rows
    torch.testing.assert_close(out[0][0], _one_rank_reference()[0].weight.detach())
    shares = [out[r][1] for r in range(2)]
    assert [len(s["moments"][0][0]) for s in shares] == [len(range(0, N, 2)), len(range(1, N, 2))]


def test_moments_saved_by_two_ranks_resume_on_one(tmp_path):
    """A checkpoint of two ranks resumed by one: the two shards re-join into the whole moments, and the
    next steps equal those of a run that was never split."""
    out = _two_ranks("_sharded_rank", tmp_path)
    whole, reference = _one_rank_reference()
    resumed_table = nn.Embedding(N, D)
    with torch.no_grad():
        resumed_table.weight.copy_(out[0][0])
    resumed = RowSparseAdam([resumed_table], _ds(weight_decay=0.1))
    resumed.load_state_dicts(out[r][1] for r in range(2))
    assert resumed.steps == reference.steps == 4
    for (m, v), (rm, rv) in zip(reference.moments(), resumed.moments(), strict=True):
        torch.testing.assert_close(rm, m)
        torch.testing.assert_close(rv, v)
    index, target = torch.tensor([0, 1, 5, 5, 11]), torch.randn(5, D)
    for table, opt in ((whole, reference), (resumed_table, resumed)):
        _loss(table, index, target).backward()
        opt.step()
    torch.testing.assert_close(resumed_table.weight, whole.weight)
