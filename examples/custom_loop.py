"""A custom training loop whose gradient exchange is :func:`fedgspo.robust_all_reduce`.

A plain torch regression model, trained data-parallel on CPU (gloo). Instead of
``dist.all_reduce`` each step flattens the gradients and calls ``robust_all_reduce``, which
replaces them in place by a robust aggregate and returns a report (flagged ranks, z-scores,
whether consensus failed). ``--attack-rank R`` makes rank R send NaN gradients: it is flagged
every step and never reaches the model.

    torchrun --standalone --nproc_per_node=2 examples/custom_loop.py --attack-rank 1
    python examples/custom_loop.py            # one process: the robust all-reduce is a no-op
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fedgspo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rule", default="median", choices=sorted(fedgspo.RULES))
    parser.add_argument("--f", type=int, default=0, help="Byzantine ranks to tolerate (2f < n for median)")
    parser.add_argument("--attack-rank", type=int, default=None, help="this rank sends NaN gradients")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.set_num_threads(1)  # CPU ranks share the machine's cores
    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(8, 1)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    flagged_steps = 0
    for step in range(args.steps):
        x = torch.randn(32, 8, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if rank == args.attack_rank:
            flat.fill_(float("nan"))
        report = fedgspo.robust_all_reduce(flat, rule=args.rule, f=args.f)  # in place, on every rank
        flagged_steps += bool(report.flagged)
        if report.consensus_failed:
            continue  # the aggregate is unusable: skip this update
        offset = 0
        for g in grads:  # copy the aggregate back into the .grad tensors
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        optimizer.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  flagged {report.flagged}")
    if rank == 0:
        print(f"done: loss {loss.item():.4f}; steps with a flagged rank: {flagged_steps}/{args.steps}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
