"""The shared training engine (engine/__init__.py): a DeepSpeed engine on CPU compiles nothing; DeepSpeed's
shared-memory all-reduce (an inference-only op it would JIT-build at every comm set-up on a machine without a
build of it) is never built, and the engine still trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_RANK = """
import json, sys, torch
import torch.distributed as dist
import engine
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/init", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
ds = engine.ds_config(engine.EngineConfig(num_workers=1), batch_size=8, lr=0.1, weight_decay=0.0)
eng = engine.initialize(model, ds, use_gpu=False)
x, y = torch.randn(8, 4), torch.randn(8, 1)
losses = []
for _ in range(5):
    loss = ((eng(x) - y) ** 2).mean()
    eng.backward(loss)
    eng.step()
    losses.append(loss.item())
from deepspeed.comm import comm
print(json.dumps({"losses": losses, "shm_op": comm.cdb.shm_comm_op is not None}))
"""


def test_a_cpu_engine_builds_no_deepspeed_op_and_trains(tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    done = subprocess.run(
        [sys.executable, "-c", ONE_RANK, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got["shm_op"] and not any(extensions.rglob("*")), "DeepSpeed built an op"
    assert got["losses"][-1] < got["losses"][0], got["losses"]  # the engine steps
