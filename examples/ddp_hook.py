"""Robust aggregation inside ``DistributedDataParallel``: the fedgspo DDP communication hook.

``model.register_comm_hook(state, fedgspo.robust_hook)`` replaces DDP's averaging
all-reduce of every gradient bucket by :func:`fedgspo.robust_all_reduce`; ``state`` collects
each bucket's report, so after ``backward()`` ``state.flagged`` names the ranks flagged in
any bucket and ``state.consensus_failed`` says whether to skip the step. Coordinate-wise
rules (mean, median, trimmed mean) are exact per bucket; see ``fedgspo/robust/ddp_hook.py``.

    torchrun --standalone --nproc_per_node=2 examples/ddp_hook.py --attack-rank 1
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fedgspo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attack-rank", type=int, default=None, help="this rank's gradients become NaN")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # run under torchrun
    rank = dist.get_rank()
    torch.set_num_threads(1)  # CPU ranks share the machine's cores
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    state = fedgspo.RobustHookState(rule="median", f=0)
    model.register_comm_hook(state, fedgspo.robust_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(8, 1)
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(args.steps):
        x = torch.randn(32, 8, generator=data)
        y = x @ target
        if rank == args.attack_rank:
            y = y * float("nan")  # a poisoned batch: NaN gradients
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # the hook aggregates each bucket robustly here
        if state.consensus_failed:
            continue
        optimizer.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  flagged {state.flagged}")
    if rank == 0:
        print(f"done: loss {loss.item():.4f}; flagged in the last step: {state.flagged}")
    del model  # DDP's reducer before the process group it uses
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
