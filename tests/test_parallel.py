"""The kernels' parallel backends (csrc/cpu/parallel.cpp): torch's OpenMP threads by default, llmkern's own pool on
request. The pool is sized by torch.set_num_threads or its own count, its workers really compute, its results equal
OpenMP's, and it stays correct with several calling threads and across fork()."""

import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import llmkern.ops as lk

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


@contextlib.contextmanager
def backend(name: str):
    previous = lk.parallel_backend()
    lk.set_parallel_backend(name)
    try:
        yield
    finally:
        lk.set_parallel_backend(previous)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_backend_default_switch_and_bad_arguments():
    assert run_python("import llmkern.ops as lk; print(lk.parallel_backend())").stdout.split() == ["openmp"]
    with backend("pool"):
        assert lk.parallel_backend() == "pool" and lk.kernel_threads() == torch.get_num_threads()
    with pytest.raises(ValueError, match="parallel backend: expected 'openmp' or 'pool', got 'tbb'"):
        lk.set_parallel_backend("tbb")
    with pytest.raises(ValueError, match="num_threads: expected 0..4096, got 5000"):
        lk.set_parallel_backend("pool", 5000)
    assert lk.parallel_backend() == "openmp"


def test_pool_with_more_threads_than_torch_takes_every_linear():
    # `llmkern serve`: the kernels on the pool's threads, torch's own ops on one; torch's GEMM is then no match.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lk.set_parallel_backend("pool", 2)
        assert lk.kernel_threads() == 2 and lk.linear_beats_torch(torch.bfloat16, 4096, 4096, 4096)
    finally:
        lk.set_parallel_backend("openmp")
        torch.set_num_threads(threads)
    assert lk.kernel_threads() == threads


def test_pool_results_equal_openmps():
    # Both split a call into the same parts, so even partition-dependent sums agree bit for bit.
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 1030, generator=gen), torch.randn(700, 1030, generator=gen)
    q, k, v = (torch.randn(2, 75, 4, 64, generator=gen, requires_grad=True) for _ in range(3))
    logits = torch.randn(9, 5000, generator=gen).bfloat16()

    def run():
        out = lk.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return [lk.linear(x, w), lk.linear(x[:3], w), out, *grads, lk.argmax(logits), lk.rms_norm(x, w[0])]

    want = run()
    with backend("pool"):
        got = run()
    for a, b in zip(want, got):
        assert torch.equal(a, b)


POOL_THREADS = """
import os, torch, llmkern.ops as lk
torch.set_num_threads({torch_threads})
lk.set_parallel_backend("pool", {pool_threads})
x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
for _ in range(20):
    lk.linear(x, w)
def cpu_ticks(tid):
    fields = open(f"/proc/self/task/{{tid}}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime
names = {{t: open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")}}
pool = [t for t, name in names.items() if name == "llmkern-pool"]
print(len(pool), sum(cpu_ticks(t) for t in pool))
"""


@linux_only
@pytest.mark.parametrize("torch_threads, pool_threads, threads", [(1, None, 1), (3, None, 3), (1, 3, 3)])
def test_pool_workers_follow_the_thread_count_and_compute(torch_threads, pool_threads, threads):
    proc = run_python(POOL_THREADS.format(torch_threads=torch_threads, pool_threads=pool_threads))
    assert proc.returncode == 0, proc.stderr
    workers, ticks = map(int, proc.stdout.split())
    assert workers == threads - 1  # the calling thread is the last one
    if threads > 1:
        assert ticks > 0, "the pool's workers never ran a part"


def test_pool_concurrent_callers_get_their_own_results():
    # One caller at a time owns the pool; the others run their kernels on their own thread.
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(37, 300, generator=gen), torch.randn(500, 300, generator=gen)) for _ in range(4)]
    expected = [lk.linear(x, w) for x, w in inputs]
    got = [[] for _ in inputs]

    def call(i):
        for _ in range(25):
            got[i].append(lk.linear(*inputs[i]))

    with backend("pool"):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for want, outs in zip(expected, got):
        assert len(outs) == 25 and all(torch.equal(out, want) for out in outs)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_pool_forked_child_runs_kernels():
    # The child has none of the parent's worker threads: it must start its own pool, not wait for ghosts.
    code = """
import os, torch, llmkern.ops as lk
torch.set_num_threads(2)
lk.set_parallel_backend("pool")
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
