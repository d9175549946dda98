"""Run one measurement in a fresh process.

A DeepSpeed engine does not hand its GPU memory back when it is deleted (its hooks and the ZeRO
optimizer keep references), so a second engine built in the same process reports the first one's
memory as its own: on the H100 an FP8 step measured after a bf16 one showed 35 GiB resident
instead of the 18 GiB it holds when measured alone. Each engine a benchmark compares is therefore
built in a child process started with `spawn` (a clean CUDA context; `fork` cannot re-initialize
CUDA), which also starts its own one-process torch.distributed group.

    from isolate import in_fresh_process
    result = in_fresh_process(measure, args, "blockwise")   # measure's return value, pickled back

`fn` must be importable by the child: a module-level function of a script run as __main__ is.
The parent must not have started torch.distributed itself (the child would reuse its port).
"""
from __future__ import annotations

import multiprocessing as mp


def in_fresh_process(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
