"""Installable by role (issue 19): what each extra of vlmrec pulls in, resolved through the installed
distributions' own metadata (the versions constraints.txt pins), so the serving image (`.[serve]`,
k8s/images/Dockerfile) provably carries no training-only package."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TRAINING_ONLY = {"deepspeed", "peft", "pytorch-metric-learning", "matplotlib", "bitsandbytes"}


def closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution `name[extras]` requires, transitively, as the installed metadata says."""
    found: set[str] = set()
    stack, done = [(name, extras)], set()
    while stack:
        dist_name, wanted = stack.pop()
        key = (canonicalize_name(dist_name), wanted)
        if key in done:
            continue
        done.add(key)
        found.add(key[0])
        try:
            requires = distribution(dist_name).requires or []
        except PackageNotFoundError:  # an optional dependency of a dependency that is not installed
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                stack.append((req.name, frozenset(req.extras)))
    return found


def test_the_serving_extra_pulls_in_no_training_only_package():
    serve = closure("vlmrec", frozenset({"serve"}))
    assert {"ray", "fastapi", "orjson", "feast", "qdrant-client", "qdrant-edge-py", "torch"} <= serve
    assert not serve & TRAINING_ONLY, sorted(serve & TRAINING_ONLY)
    assert "streamlit" not in serve


@pytest.mark.parametrize(
    ("extra", "needs"),
    [("train", {"deepspeed", "peft", "pytorch-metric-learning", "matplotlib"}), ("ui", {"streamlit"})],
)
def test_each_role_extra_brings_its_own_packages(extra, needs):
    assert needs <= closure("vlmrec", frozenset({extra}))
    assert not needs & closure("vlmrec")  # the core never does


def test_the_packages_ship_their_type_marker():
    from importlib.resources import files

    for package in ("vlmrec", "engine", "teacher", "training", "serving", "index", "ui"):
        assert files(package).joinpath("py.typed").is_file(), package
