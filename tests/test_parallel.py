"""llmkern's thread pool (csrc/cpu/parallel.cpp): sized by torch.set_num_threads, its workers really compute, and it
stays correct with several calling threads and across fork()."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import llmkern.ops as lk

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


POOL_THREADS = """
import os, torch, llmkern.ops as lk
torch.set_num_threads({threads})
x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
for _ in range(20):
    lk.linear(x, w)
def cpu_ticks(tid):
    fields = open(f"/proc/self/task/{{tid}}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
pool = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{{t}}/comm").read().strip() == "llmkern-pool"]
print(len(pool), sum(cpu_ticks(t) for t in pool))
"""


@linux_only
@pytest.mark.parametrize("threads", [1, 3])
def test_workers_follow_torch_thread_count_and_compute(threads):
    proc = run_python(POOL_THREADS.format(threads=threads))
    assert proc.returncode == 0, proc.stderr
    workers, ticks = map(int, proc.stdout.split())
    assert workers == threads - 1  # the calling thread is the last one
    if threads > 1:
        assert ticks > 0, "the pool's workers never ran a part"


def test_concurrent_callers_get_their_own_results():
    # One caller at a time owns the pool; the others run their kernels on their own thread.
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(37, 300, generator=gen), torch.randn(500, 300, generator=gen)) for _ in range(4)]
    expected = [lk.linear(x, w) for x, w in inputs]
    got = [[] for _ in inputs]

    def call(i):
        for _ in range(25):
            got[i].append(lk.linear(*inputs[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, outs in zip(expected, got):
        assert len(outs) == 25 and all(torch.equal(out, want) for out in outs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_forked_child_runs_kernels():
    # The child has none of the parent's worker threads: it must start its own pool, not wait for ghosts.
    code = """
import os, torch, llmkern.ops as lk
torch.set_num_threads(2)
x, w = torch.randn(64, 512), torch.randn(512, 512)
want = lk.linear(x, w)
pid = os.fork()
if pid == 0:
    ok = all(torch.equal(lk.linear(x, w), want) for _ in range(5))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]
