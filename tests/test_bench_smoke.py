"""Smoke test of the benchmark suite on tiny shapes (no torch.compile), so CI catches a broken bench.
Asserts only that it runs and produces sane rows; speed is never asserted."""

import pytest
import torch

from bench import bench_norm, harness
from bench.__main__ import main

TINY = dict(reps=2, warmup=1, tokens=16, ceiling_bytes=1 << 20, mm_n=64, rotate_bytes=1 << 16, compile=False)


def test_probes_copy_and_read(cpu_isa):
    src = torch.randn(70001)  # odd size: the scalar tail runs too
    dst = torch.full_like(src, float("nan"))
    torch.ops.llmkern.bench_copy_(dst, src)
    assert torch.equal(dst, src)
    assert torch.ops.llmkern.bench_read(src) == pytest.approx(src.double().sum().item(), rel=1e-5, abs=1e-3)


def test_probe_fma(cpu_isa):
    out = torch.full((3,), float("nan"))  # more tasks than threads: each still writes its own entry
    flops = torch.ops.llmkern.bench_fma_(out, 1000)
    lanes = flops // (2 * 3 * 1000)  # chains x vector width of this ISA
    assert lanes > 0 and flops == 2 * 3 * 1000 * lanes
    # Every chain x -> 0.5 x + 1 has settled at exactly 2 after 1000 rounds: the sum over a task's lanes is 2 lanes.
    assert out.tolist() == [2.0 * lanes] * 3
    assert torch.ops.llmkern.bench_fma_(out, 0) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: torch.ops.llmkern.bench_fma_(torch.empty(2), -1), "iters: expected a count >= 0"),
        (lambda: torch.ops.llmkern.bench_fma_(torch.empty(2).double(), 1), "out: expected dtype float32"),
        (lambda: torch.ops.llmkern.bench_read(torch.randn(8, 8).t()), "src: expected a contiguous"),
        (lambda: torch.ops.llmkern.bench_read(torch.randn(8).bfloat16()), "src: expected dtype float32"),
        (lambda: torch.ops.llmkern.bench_copy_(torch.empty(3), torch.randn(4)), "src: expected the numel"),
        (lambda: torch.ops.llmkern.bench_copy_(torch.empty(4).double(), torch.randn(4)), "dst: expected dtype"),
    ],
)
def test_probes_bad_inputs(call, match):
    with pytest.raises((RuntimeError, TypeError), match=match):
        call()


def test_measure_interleaves_every_fn_in_a_changing_order():
    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in "abcd"}
    harness.measure(fns, reps=40, warmup=1)
    assert all(sum(n == name for n, _ in calls) == 41 for name in fns)
    timed = [name for name, _ in calls[len(fns):]]  # after the warm-up calls
    rounds = [timed[i : i + 4] for i in range(0, len(timed), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each round calls each fn once
    # No fn always follows the same one (a bandwidth probe's after-effect must not land on one fn only).
    before_a = {r[r.index("a") - 1] for r in rounds if r.index("a") > 0}
    assert len(before_a) > 1 and len({r[0] for r in rounds}) > 1


def test_measure_primes_right_before_each_timed_call():
    calls = []
    fns = {name: (lambda i, name=name: calls.append(name)) for name in "abc"}
    harness.measure(fns, reps=10, warmup=2, prime={"a": lambda: calls.append("prime a")})
    timed = calls[2 * len(fns):]  # warm-up calls are not primed
    assert "prime a" not in calls[: 2 * len(fns)]
    assert timed.count("prime a") == timed.count("a") == 10
    assert all(timed[i + 1] == "a" for i, c in enumerate(timed) if c == "prime a")


def test_ceilings_and_norm_bench():
    cfg = harness.Config(**TINY)
    c = harness.measure_ceilings(cfg)
    assert c.copy > 0 and c.read_gbps[0] > 0 and set(c.matmul_gflops) == {"float32", "bfloat16"} and c.fma_gflops > 0
    assert "float32 FMA peak" in harness.format_ceilings(c, cfg)
    rows = bench_norm.run(cfg)
    # fwd, fused in place, bwd (preallocated), bwd +alloc; for fp32 and bf16
    assert [r.op for r in rows[:4]] == ["rms_norm", "fused_add_rms_norm_", "rms_norm bwd", "rms_norm bwd +alloc"]
    assert len(rows) == 8 and all(r.times["llmkern"].median_s > 0 and "compile" not in r.times for r in rows)
    table = harness.format_table(harness.HEADER, harness.table_rows(rows), markdown=True)
    assert table.count("\n") == len(rows) + 1


def test_main_quick_cli_runs(capsys, monkeypatch):
    monkeypatch.setattr(harness.Config, "quick_config", classmethod(lambda cls: cls(**TINY)))
    assert main(["--quick", "--only", "norm", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "rms_norm bwd" in out and "copy bandwidth" in out


def test_loss_bench_quick():
    from bench import bench_loss

    rows = bench_loss.run(harness.Config(**TINY))
    assert [(r.op, r.dtype) for r in rows] == [("cross_entropy_grad_", "float32"), ("cross_entropy_grad_", "bfloat16")]
    assert all(r.times["llmkern"].median_s > 0 and r.times["eager"].median_s > 0 for r in rows)


def test_attention_bench_quick():
    from bench import bench_attention

    cfg = harness.Config.quick_config()
    cfg.reps, cfg.warmup, cfg.budget_s, cfg.compile = 2, 1, 0.1, False
    ceilings = harness.Ceilings([1.0], [1.0], {"float32": 1.0, "bfloat16": 1.0}, 1)
    rows = bench_attention.run(cfg, ceilings)
    assert [r[0].split()[0] for r in rows] == ["prefill"] * 4 + ["decode"] * 2 + ["fwd"] * 2
    assert rows[5][0].endswith("huge pages")
    assert all(len(r) == len(bench_attention.HEADER) for r in rows)
    assert all(r[7].endswith("MiB") for r in rows[-2:]), "peak memory was not measured"


def test_quant_bench_quick():
    from bench import bench_quant

    cfg = harness.Config.quick_config()
    cfg.reps, cfg.warmup, cfg.budget_s, cfg.compile, cfg.rotate_bytes = 2, 1, 0.1, False, 1 << 16
    ceilings = harness.Ceilings([1.0], [1.0], {"float32": 1.0, "bfloat16": 1.0}, 1)
    rows = bench_quant.run(cfg, ceilings)
    assert [r[0].split()[0] for r in rows] == ["nf4", "int4", "int8", "dense"] * 2 + ["nf4", "int4", "int8"]
    assert all(len(r) == len(bench_quant.HEADER) for r in rows)
    assert all(float(r[2]) > 0 for r in rows[:6]) and rows[1][6] != "-", "int4 rows compare with int4pack"
    assert all(r[2].endswith("of expected)") for r in rows[-3:]), "resident memory was not measured"


def test_matmul_bench_quick():
    from bench import bench_matmul

    cfg = harness.Config.quick_config()
    cfg.reps, cfg.warmup, cfg.budget_s, cfg.rotate_bytes = 2, 1, 0.1, 1 << 16
    ceilings = harness.Ceilings([1.0], [1.0], {"float32": 1.0, "bfloat16": 1.0}, 1)
    rows = bench_matmul.run(cfg, ceilings)
    assert [r[0].split()[0] for r in rows] == ["forward", "dx", "dW"]
    assert [r[1] for r in rows] == ["256x64x48", "256x48x64", "64x48x256"]
    assert all(len(r) == len(bench_matmul.HEADER) and float(r[2]) > 0 for r in rows)


def test_model_bench_quick():
    from bench import bench_model

    cfg = harness.Config.quick_config()
    cfg.ceiling_bytes = 1 << 20
    rows = bench_model.run(cfg)
    assert [r[0].split(",")[0] for r in rows] == ["decode bf16"] * 2 + ["prefill bf16"] + ["decode int4"] * 2
    assert all(len(r) == len(bench_model.HEADER) for r in rows)
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3] != "-", "transformers was not timed"
