"""CPU lanes: an embed actor's micro-batches run side by side, each on its own thread(s).

One forward spread over every core waits at each OpenMP barrier for its slowest thread; on a
node shared with tokenizers, readers and Ray's own processes that thread is often preempted,
and the others idle. Lanes of one thread each never wait for one another: all-MiniLM-L6-v2 on
2 cores, 1,000 real documents, with another process using 40% of one core, ran the same
micro-batches in 11.89 s as one 2-thread forward and in 8.84 s as two 1-thread lanes (8.17 s
vs 7.63 s quiet; docs/benchmarks.md, benchmarks/lanes.py).
Torch releases the GIL inside its kernels, so the lanes are threads sharing one copy of the model.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

__all__ = ["Lanes", "forward_is_reentrant"]


class Lanes:
    """`n` worker threads taking micro-batches first come, first served: a second window's
    micro-batches queue behind the first's and fill its tail."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="embed-lane")

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    @staticmethod
    def wait_any(futures) -> set[Future]:
        """The futures of `futures` that are done, once at least one is."""
        return wait(futures, return_when=FIRST_COMPLETED).done


def forward_is_reentrant(model) -> bool:
    """Whether two forwards of `model` may run at once. Not when a module rewrites its own state
    in forward: transformers' dynamic and longrope rotary embeddings replace `inv_freq` from
    each call's sequence length, so a lane could run with the frequencies of another lane's
    micro-batch (a wrong vector, silently)."""
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        for k in kind.values() if isinstance(kind, dict) else [kind]:
            if isinstance(k, str) and ("dynamic" in k or k == "longrope"):
                return False
    return True
