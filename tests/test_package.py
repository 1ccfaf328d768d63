"""Package-level behaviour: lean import, the info command, the CPU ISA switch."""

import os
import subprocess
import sys

import pytest
import torch

import llmkern
import llmkern.ops as lk


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_import_without_compiled_extension_then_clear_error():
    # sys.modules[name] = None makes `from llmkern import _C` raise ImportError, as a missing build does.
    code = (
        "import sys; sys.modules['llmkern._C'] = None\n"
        "import llmkern, torch\n"
        "assert not llmkern._c_available()\n"
        "try:\n"
        "    llmkern.ops.rms_norm(torch.randn(2, 8))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "llmkern._C failed to load" in proc.stdout and "make build" in proc.stdout


def test_import_does_not_touch_cuda():
    proc = run_python("import torch, llmkern; print(torch.cuda.is_initialized())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_info_lists_version_isa_and_every_op():
    proc = subprocess.run([sys.executable, "-m", "llmkern.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"llmkern {llmkern.__version__}" in out and f"torch {torch.__version__}" in out
    assert f"cpu isa: {lk.cpu_isa()}" in out and "threads:" in out and "cuda kernels:" in out
    assert "transparent huge pages:" in out
    for op in ("rms_norm", "fused_add_rms_norm_", "rms_norm_bwd"):
        assert f"llmkern::{op}(" in out


def test_cli_info():
    from llmkern.cli import main

    main(["info"])


def test_cpu_isa_env_forces_a_path():
    for isa in lk.supported_cpu_isas():
        proc = run_python("import llmkern.ops as lk; print(lk.cpu_isa())", LLMKERN_CPU_ISA=isa)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == isa


def test_cpu_isa_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="expected one of scalar, avx2, avx512, avx512bf16, amx, got 'sse9'"):
        lk.set_cpu_isa("sse9")
    missing = [isa for isa in ("scalar", "avx2", "avx512", "avx512bf16", "amx") if isa not in lk.supported_cpu_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            lk.set_cpu_isa(isa)


def test_cpu_isa_env_unknown_is_clear_error_at_first_use():
    proc = run_python("import llmkern.ops as lk; lk.cpu_isa()", LLMKERN_CPU_ISA="sse9")
    assert proc.returncode != 0
    assert "expected one of scalar, avx2, avx512, avx512bf16, amx, got 'sse9'" in proc.stderr


def test_extension_links_openmp_so_parallel_for_is_parallel():
    # at::parallel_for's OpenMP backend (llmkern's default parallel backend) is compiled into our own objects:
    # built without OpenMP it quietly runs every kernel on one thread. The extension must need libgomp (resolved
    # to torch's copy).
    import shutil

    import llmkern._C as C

    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with the OpenMP parallel backend")
    if shutil.which("readelf") is None:
        pytest.skip("readelf not found")
    dynamic = subprocess.run(["readelf", "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in dynamic
