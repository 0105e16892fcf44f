"""Two gloo processes on CPU: energies are averaged across ranks and parameters stay identical."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that waits on a peer longer than this fails instead of blocking (gloo's default is 30 min).
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
# The whole two-process run takes a few seconds; past this the ranks are killed and the test fails.
JOIN_TIMEOUT_S = 180


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adaprelora import AdaPreLoRA
    from adaprelora.testing.lora_models import batch, make_lora_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        torch.manual_seed(0)
        model = DDP(make_lora_model(seed=0))
        opt = AdaPreLoRA(model, lr=1e-2)
        record = {}
        for step in range(3):
            ids, img, y = batch(seed=10 * step + rank)  # different data on each rank
            ((model(ids, img) - y) ** 2).mean().backward()
            if step == 0:
                record["local"] = [r.clone() for r in opt._collector.rows]
                opt._collector.synchronize()
                record["synced"] = [r.clone() for r in opt._collector.rows]
            opt.step()
            opt.zero_grad()
        record["params"] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together: tearing down while the peer has already exited can block in gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(world, *args):
    """Spawns `world` ranks of `_worker` and joins them within JOIN_TIMEOUT_S; a stuck run fails, killed."""
    context = mp.spawn(_worker, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=1):  # raises if a rank failed, with that rank's traceback
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            for p in context.processes:
                p.join(timeout=10)
            pytest.fail(f"DDP ranks {alive} still running after {JOIN_TIMEOUT_S} s: killed (a hang, not a slow run)")


@pytest.mark.timeout(JOIN_TIMEOUT_S + 60)
@pytest.mark.slow
def test_two_process_ddp_keeps_parameters_identical_and_averages_energies(tmp_path):
    _run_ranks(2, _free_port(), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert torch.equal(r0["params"], r1["params"])
    for a, b, s0, s1 in zip(r0["local"], r1["local"], r0["synced"], r1["synced"]):
        assert not torch.allclose(a, b), "ranks saw the same data: the test would prove nothing"
        torch.testing.assert_close(s0, (a + b) / 2)
        torch.testing.assert_close(s1, (a + b) / 2)
