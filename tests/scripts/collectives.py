"""torchrun entry point for tests/test_distributed.py: exercises the collectives on gloo and dumps results."""

import json
import sys

import torch

from pipeline import config, distributed

cfg = config.load(sys.argv[1])
out = sys.argv[2]
with distributed.distributed(cfg.train) as env:
    rank_seed = distributed.seed_everything(cfg.seed, env.rank)
    # Rank r holds r + 1 rows: sizes differ per rank.
    local = torch.arange(env.rank + 1, dtype=torch.float32).unsqueeze(1) + 10 * env.rank
    gathered = distributed.all_gather_cat(local)
    summed = distributed.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    mean = distributed.all_reduce_mean({"x": float(env.rank), "y": 2.0}, env.device)
    stop = distributed.any_rank(env.rank == 1, env.device)
    obj = distributed.broadcast_object({"from": env.rank})
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(float(env.rank))
    bn.running_var.fill_(1.0 + 2 * env.rank)
    distributed.average_buffers(bn)
    result = {
        "rank": env.rank,
        "world": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "seed": rank_seed,
        "gathered": gathered.squeeze(1).tolist(),
        "sum": summed.item(),
        "mean": mean,
        "stop": stop,
        "obj": obj,
        "bn": [bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked)],
    }
    with open(f"{out}/rank{env.rank}.json", "w") as f:
        json.dump(result, f)
