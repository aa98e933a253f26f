"""A/B experiments: arms of one deployment, each a producer and its model run, and who sees which.

    experiment = Experiment.from_dict({"name": "student-v2", "arms": [
        {"name": "control", "producer": "student", "share": 0.5},
        {"name": "v2", "producer": "student", "run": "student-v2", "share": 0.5}]})
    arm = experiment.assign(user_id)          # sticky: the same user, the same arm, on every replica

Producer arms split /v1/candidates' default traffic; Mixer arms (`weights`, no producer) split the
default blend of /v1/mix (requests that give neither quotas nor weights).

A user's arm is a salted hash of their id (blake2b of "<salt>:<user_id>", salt = the experiment's name
unless given), read as a number in [0, 1) and placed on the arms' cumulative shares: uniform, sticky, and
independent across experiments with different salts. `force` pins users to an arm (debugging). An arm
with a `run` serves that run's export with its own index (`indexes/<run>`, built by `vlmrec index build
--run <run>`), loaded beside the deployment's: two student runs side by side.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from serving.config import PRODUCERS
from vlmrec.workspace import check_name

MODEL_PRODUCERS = ("student", "sasrec")  # the producers an arm may give another run


@dataclass(frozen=True)
class Arm:
    """A producer arm (`producer`, optionally another `run` of it) answers /v1/candidates' default traffic;
    a Mixer arm (`weights`) is the default blend of /v1/mix requests that give neither quotas nor weights."""

    name: str
    producer: str | None  # one of serving.config.PRODUCERS (a producer arm)
    share: float  # of the experiment's users, 0..1; the arms' shares sum to 1
    run: str | None = None  # student / sasrec: this run's export instead of the deployment's
    weights: dict[str, float] | None = None  # a Mixer arm: its blend over PRODUCERS

    @property
    def kind(self) -> str:
        return "mix" if self.weights is not None else "candidates"

    @property
    def key(self) -> str:
        """The State.sources key of what it serves: the producer itself, or the arm's own run of it."""
        if self.producer is None:
            raise ValueError(f"arm {self.name}: a Mixer arm serves no single producer")
        return self.producer if self.run is None else f"arm:{self.name}"


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    salt: str | None = None  # default: the name (a new salt reshuffles users)
    force: dict[int, str] = field(default_factory=dict)  # user_id -> arm name (debugging)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if not self.name or not self.arms:
            raise ValueError("experiment: a name and at least one arm")
        if len(set(names)) != len(names):
            raise ValueError(f"experiment.arms: arm names must be unique, got {names}")
        if len({a.kind for a in self.arms}) > 1:
            raise ValueError("experiment.arms: all producer arms or all Mixer (weights) arms, not both")
        for a in self.arms:
            if a.weights is not None:
                if a.producer is not None or a.run is not None:
                    raise ValueError(f"experiment.arms.{a.name}: a Mixer arm has weights, no producer or run")
                bad = sorted(set(a.weights) - set(PRODUCERS))
                values = list(a.weights.values())
                if (
                    bad
                    or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in values)
                    or not sum(values) > 0
                ):
                    raise ValueError(
                        f"experiment.arms.{a.name}.weights: >= 0 over {list(PRODUCERS)}, not all 0; got {a.weights}"
                    )
                continue
            if a.producer not in PRODUCERS:
                raise ValueError(
                    f"experiment.arms.{a.name}.producer: one of {list(PRODUCERS)}, got {a.producer!r}"
                )
            if a.run is not None and a.producer not in MODEL_PRODUCERS:
                raise ValueError(f"experiment.arms.{a.name}.run: only {list(MODEL_PRODUCERS)} take a run")
            if a.run is not None:
                check_name(a.run, f"experiment.arms.{a.name}.run")
            if not (isinstance(a.share, (int, float)) and math.isfinite(a.share) and 0 <= a.share <= 1):
                raise ValueError(f"experiment.arms.{a.name}.share: a number in [0, 1], got {a.share!r}")
        if abs(sum(a.share for a in self.arms) - 1.0) > 1e-9:
            raise ValueError(f"experiment.arms: shares must sum to 1, got {sum(a.share for a in self.arms)}")
        unknown = sorted(set(self.force.values()) - set(names))
        if unknown:
            raise ValueError(f"experiment.force: unknown arms {unknown}")

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        """From a Serve user_config's `experiment` mapping (see the module docstring)."""
        if not isinstance(d, dict):
            raise ValueError("experiment: a mapping with name and arms")
        extra = sorted(set(d) - {"name", "arms", "salt", "force"})
        if extra:
            raise ValueError(f"experiment: unknown keys {extra}")
        arms = []
        for i, a in enumerate(d.get("arms") or ()):
            if (
                not isinstance(a, dict)
                or set(a) - {"name", "producer", "share", "run", "weights"}
                or "name" not in a
            ):
                raise ValueError(
                    f"experiment.arms.{i}: a mapping of name, share and producer (optional run) or weights"
                )
            weights = a.get("weights")
            if weights is not None and not isinstance(weights, dict):
                raise ValueError(f"experiment.arms.{i}.weights: a mapping of producer to weight")
            producer = a.get("producer")
            arms.append(
                Arm(
                    str(a["name"]),
                    None if producer is None and weights is not None else str(producer or ""),
                    a.get("share", -1),
                    a.get("run"),
                    None if weights is None else {str(k): v for k, v in weights.items()},
                )
            )
        force = {int(u): str(arm) for u, arm in (d.get("force") or {}).items()}
        return cls(str(d.get("name", "")), tuple(arms), d.get("salt"), force)

    def position(self, user_id: int) -> float:
        """The user's place in [0, 1): the first 8 bytes of blake2b("<salt>:<user_id>") over 2**64."""
        salt = self.name if self.salt is None else self.salt
        digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    @property
    def kind(self) -> str:
        """What the experiment splits: "candidates" (producer arms) or "mix" (Mixer arms)."""
        return self.arms[0].kind

    def assign(self, user_id: int) -> Arm:
        """The user's arm: a forced one, else the arm whose cumulative share interval holds their place."""
        forced = self.force.get(int(user_id))
        if forced is not None:
            return next(a for a in self.arms if a.name == forced)
        u, edge = self.position(user_id), 0.0
        for arm in self.arms:
            edge += arm.share
            if u < edge:
                return arm
        return next(a for a in reversed(self.arms) if a.share > 0)  # float rounding at the very top


def default_traffic_keys(default_producer: str, experiment: Experiment | None) -> list[str]:
    """The sources that answer /v1/candidates' default traffic: the default producer, and every arm of a
    producer experiment (State.sources keys). They must load and be ready."""
    arms = experiment.arms if experiment is not None and experiment.kind == "candidates" else ()
    return list(dict.fromkeys([default_producer, *(a.key for a in arms)]))
