"""The check that several training processes really averaged their gradients, run on a real gloo process group of
two processes: identical replicas pass, replicas that trained apart are caught (the run then fails with a clear error
instead of serving one rank's adapter)."""

import json
import os
from types import SimpleNamespace

import pytest

from tutor_wrap.backends.llama_server import free_port

pytestmark = pytest.mark.e2e   # real process groups over gloo, as the two-process training uses


def _rank(rank: int, port: int, same: bool, path: str) -> None:
    import torch
    import torch.distributed as dist

    from tutor_wrap.backends.axolotl_plugin import MetricsCallback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0 if same else rank)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        model[1].weight.requires_grad_(False)   # frozen weights are not compared (a LoRA base)
        if same:
            with torch.no_grad():
                model[1].weight.add_(rank)      # ... so a difference there does not count
        callback = MetricsCallback(path)
        callback.on_step_end(SimpleNamespace(world_size=2, deepspeed=None, fsdp=None),
                             SimpleNamespace(global_step=1), None, model=model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_replicas_are_compared_across_a_real_process_group(tmp_path, same):
    import torch.multiprocessing as mp

    path = tmp_path / "metrics.jsonl"
    mp.spawn(_rank, args=(free_port(), same, str(path)), nprocs=2, join=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1, "only rank 0 writes"
    row = rows[0]
    assert row["event"] == "ranks" and row["world_size"] == 2 and row["backend"] == "gloo"
    assert len(row["digests"]) == 2 and row["in_sync"] is same
    assert (row["digests"][0] == row["digests"][1]) is same
