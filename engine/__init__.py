"""The Ray Train + DeepSpeed engine shared by vlmrec's training jobs, owned by neither: the student
(training/train.py) and the teacher tuning (teacher/tune/). One DeepSpeed JSON (engine/zero.json), a TorchTrainer of CPU
(gloo) or GPU (NCCL) workers, a DeepSpeed checkpoint reported to Ray Train every epoch, resume from the
latest one (a re-run of the same run folder, or Ray restarting failed workers), fp32 weights out of it.

    # driver
    result = fit(train_loop, loop_config, {"train": dataset}, run_dir, EngineConfig(), score="val_loss")
    # worker (inside train_loop); rows: embedding tables updated row-sparse beside DeepSpeed (engine/rows.py)
    rows = RowSparseAdam([model.id_in, model.id_out], ds)
    engine = initialize(model, ds, use_gpu, exclude=rows.params)
    state = resume(engine, {"epoch": 0, ...}, rows=rows)
    ... engine.backward(loss); rows.step(); engine.step()
    ... report(engine, metrics, state, rows=rows)
    # driver again
    weights = fp32_state_dict(result.best_checkpoints[0][0])
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.config import _Config, at_least

if TYPE_CHECKING:  # annotations only: importing the engine (peak_rss_mb in a data task) costs no torch
    import torch

    from engine.rows import RowSparseAdam

ZERO_CONFIG = Path(__file__).with_name("zero.json")
CHECKPOINT_TAG = "ds"
ROWS_FILE = "rows-{rank}-of-{world}.pt"  # each rank's share of engine.rows.RowSparseAdam's moments
# How often Ray Train's controller polls the workers (its default: 2 s). A worker's report waits in a queue of
# one until a poll takes it, so with the default an epoch shorter than 2 s waited for the next poll; a poll
# is one small actor call per worker. RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the driver's environment wins.
POLL_S = 0.2


@dataclass(frozen=True)
class EngineConfig(_Config):
    """Where and how a job runs: workers, device, precision, the DeepSpeed JSON, fault tolerance."""

    num_workers: int = 2  # Ray Train workers (data parallel); 2 fit a 2-core machine with 1 CPU each
    use_gpu: bool = False  # NCCL + one GPU per worker when True
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_config: str = str(ZERO_CONFIG)  # the DeepSpeed JSON; batch size, lr and precision come from configs
    max_failures: int = 2  # worker failures Ray Train recovers from (resuming from the latest checkpoint)

    def __post_init__(self) -> None:
        at_least(self, 1, "num_workers")
        at_least(self, -1, "max_failures")  # -1: Ray Train retries without end
        if not Path(self.zero_config).is_file():
            raise FileNotFoundError(f"zero_config: no DeepSpeed JSON at {self.zero_config}")


def ds_config(
    engine: EngineConfig,
    batch_size: int,
    lr: float,
    weight_decay: float,
    world_size: int | None = None,
    grad_clip: float | None = None,
) -> dict:
    """The ZeRO JSON with batch size, lr, precision (and gradient clipping, when given) set from the configs
    (DeepSpeed fills no "auto")."""
    cfg = json.loads(Path(engine.zero_config).read_text())
    world = world_size or engine.num_workers
    micro = max(1, batch_size // world)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["train_batch_size"] = micro * world * cfg.get("gradient_accumulation_steps", 1)
    cfg["optimizer"]["params"].update(lr=lr, weight_decay=weight_decay)
    cfg["bf16"] = {"enabled": engine.precision == "bf16"}
    if grad_clip is not None:
        cfg["gradient_clipping"] = float(grad_clip)  # 0.0: DeepSpeed clips nothing
    return cfg


# ------------------------------------------------------------------------------------------- workers


def initialize(
    model: torch.nn.Module,
    ds: dict,
    use_gpu: bool,
    param_groups: list[dict] | None = None,
    exclude: Sequence[torch.nn.Parameter] = (),
):
    """Join Ray Train's process group (gloo on CPU, NCCL on GPU) and wrap `model` in a DeepSpeed engine that
    optimises its trainable parameters only (frozen ones, e.g. a LoRA base, get no optimizer state);
    param_groups: torch optimizer groups (e.g. their own lr) instead of one group of all trainable ones;
    exclude: trainable parameters another optimizer steps (engine.rows.RowSparseAdam's tables)."""
    import deepspeed

    _build_no_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    # DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-d tensors (CLIP's and
    # jina-clip's logit_scale): frozen ones are broadcast as (1,) and given their shape back.
    scalars = [p for p in model.parameters() if p.dim() == 0]
    if any(p.requires_grad for p in scalars):
        raise ValueError("trainable 0-d parameters cannot go through DeepSpeed: give them shape (1,)")
    for p in scalars:
        p.data = p.data.reshape(1)
    kept_out = {id(p) for p in exclude}
    params = param_groups or [p for p in model.parameters() if p.requires_grad and id(p) not in kept_out]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    for p in scalars:
        p.data = p.data.reshape(())
    return engine


def _build_no_shm_op() -> None:
    """Keep DeepSpeed's comm backend from compiling its shared-memory all-reduce. On CPU it JIT-builds that C++
    op (deepspeed_shm_comm) whenever it sets up communication and ~/.cache/torch_extensions lacks a build for
    this environment: tens of seconds on two cores, on every fresh machine, container or HOME. Only DeepSpeed's
    inference all-reduce (tensor-parallel module injection) calls it; training's collectives go through
    torch.distributed. Marked incompatible, the op is never built (the backend then holds None for it)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}


def resume(engine, state: dict, frozen_excluded: bool = False, rows: RowSparseAdam | None = None) -> dict:
    """`state` updated from the latest checkpoint's client state when Ray Train hands one over (a re-run of
    the same run folder, or a restarted worker group); the engine's weights and optimizer restored (and
    `rows`' moments: their tables' weights are in the module's state dict)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return state
    with checkpoint.as_directory() as d:
        _, client_state = engine.load_checkpoint(
            d, tag=CHECKPOINT_TAG, load_module_strict=not frozen_excluded
        )
        if rows is not None:
            rows.load_state_dicts(torch_load(path) for path in _rows_files(Path(d), *rows.rank_world))
    return {**state, **{k: v for k, v in (client_state or {}).items() if k in state}}  # ours, not DeepSpeed's


def report(
    engine, metrics: dict, state: dict, exclude_frozen: bool = False, rows: RowSparseAdam | None = None
) -> None:
    """Save a DeepSpeed checkpoint (every rank its shard) carrying `state`, and report it with `metrics`.
    exclude_frozen: leave frozen weights out (a LoRA base is never modified: no need to store it per epoch);
    rows: the row-sparse tables' moments, every rank its share, beside DeepSpeed's shards."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(
            tmp, tag=CHECKPOINT_TAG, client_state=state, exclude_frozen_parameters=exclude_frozen
        )
        if rows is not None:
            import torch

            rank, world = rows.rank_world
            torch.save(rows.state_dict(), Path(tmp) / ROWS_FILE.format(rank=rank, world=world))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _rows_files(folder: Path, rank: int, world: int) -> list[Path]:
    """The moments' files a rank reads on resume: its own when the checkpoint has as many ranks, else all."""
    own = folder / ROWS_FILE.format(rank=rank, world=world)
    return [own] if own.is_file() else sorted(folder.glob(ROWS_FILE.format(rank="*", world="*")))


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux ru_maxrss is in KiB), since it started or since the last
    `reset_peak_rss()`."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux: 5 to /proc/self/clear_refs), so that a task in
    a reused worker process reports its own peak. Where the kernel refuses, the peak stays the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# -------------------------------------------------------------------------------------------- driver


def fit(
    train_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    run_dir: Path,
    engine: EngineConfig,
    score: str,
    order: Literal["max", "min"] = "max",
    keep: int = 2,
):
    """Run `train_loop` on engine.num_workers Ray Train workers; checkpoints under run_dir/ray, the `keep`
    best by metric `score` kept. The same run_dir resumes from its latest checkpoint. -> ray.train.Result"""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vlmrec.raycluster import init_ray

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if engine.use_gpu else "cpu")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_S))  # Ray Train passes it on
    init_ray()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=engine.num_workers, use_gpu=engine.use_gpu, resources_per_worker={"CPU": 1}
        ),
        datasets=datasets,
        run_config=RunConfig(
            name="ray",
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep, checkpoint_score_attribute=score, checkpoint_score_order=order
            ),
            failure_config=FailureConfig(max_failures=engine.max_failures),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}},
        ),
    )
    return trainer.fit()


def fp32_state_dict(checkpoint, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint reported through Ray Train (any ZeRO stage) -> fp32 state dict, with the
    parameters kept out of DeepSpeed's optimizer (row-sparse tables) from the module's state dict."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(
            d, tag=CHECKPOINT_TAG, exclude_frozen_parameters=exclude_frozen
        )
        module = torch_load(Path(d) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")["module"]
    return {**state, **{k: v for k, v in module.items() if k not in state}}


def torch_load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
