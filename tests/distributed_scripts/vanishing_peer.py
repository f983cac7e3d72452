"""Rank 1 leaves without taking part in a collective; rank 0's all-reduce must fail
within the process group's timeout instead of hanging (tests/test_distributed.py)."""

import sys
import time

import torch

from abmll_tune.distributed import all_reduce_mean_, init_process_group

world, rank = init_process_group(torch.device("cpu"), timeout_s=float(sys.argv[1]))
if rank == 1:
    sys.exit(0)  # a clean exit: torchrun has no failure to react to
start = time.perf_counter()
try:
    all_reduce_mean_([torch.ones(3)])
except Exception as err:  # gloo: timeout or connection closed
    print(
        f"rank 0: collective failed after {time.perf_counter() - start:.1f} s: {type(err).__name__}"
    )
    sys.exit(3)
print("rank 0: the collective returned")
