"""The CPU panel kernel (serve/modeling/cpu_kernel.c): equal to the dense matmul for any shape and row count, the same
result for a row whatever batch it is in, built once per cache folder, and a clear reason wherever it cannot run."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from serve.modeling import cpu_kernel
from serve.modeling.cpu_kernel import cpu_flags, load_panel_kernel, unusable_reason


@pytest.fixture
def kernel(tmp_path_factory):
    built, why_not = load_panel_kernel(str(tmp_path_factory.getbasetemp() / "kernel-cache"))
    assert built is not None, why_not
    return built


def operands(out_features: int, in_features: int, rows: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    return weight, x, torch.randn(out_features, generator=generator) if bias else None


@pytest.mark.parametrize("out_features,in_features", [(64, 32), (50, 37), (300, 64), (7, 5), (17, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_it_equals_the_dense_matmul(kernel, out_features, in_features, rows, bias):
    weight, x, b = operands(out_features, in_features, rows, bias)
    got = kernel.linear(x, kernel.pack(weight), b, out_features)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_leading_dimensions_strided_inputs_and_no_rows(kernel):
    weight, x, b = operands(48, 24, 12, bias=True)
    panels = kernel.pack(weight)
    batched = x.view(3, 4, 24)
    torch.testing.assert_close(kernel.linear(batched, panels, b, 48), F.linear(batched, weight, b))
    strided = torch.randn(24, 12).t()  # [12, 24], not contiguous
    torch.testing.assert_close(kernel.linear(strided, panels, b, 48), F.linear(strided, weight, b))
    assert kernel.linear(x[:0], panels, b, 48).shape == (0, 48)


def test_a_row_gets_the_same_bits_alone_and_in_any_batch(kernel):
    """Each output is one ordered sum over the inputs: a sequence's logits do not depend on its batch-mates."""
    weight, x, _ = operands(100, 72, 20, bias=False)
    panels = kernel.pack(weight)
    alone = kernel.linear(x[7:8], panels, None, 100)
    for rows in (range(6, 9), range(0, 8), range(0, 20), range(7, 13)):
        batch = kernel.linear(x[list(rows)], panels, None, 100)
        assert torch.equal(batch[list(rows).index(7)], alone[0])


def test_it_is_built_once_per_cache_folder(tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    first, why_not = load_panel_kernel(folder)
    assert first is not None, why_not
    assert [path.name for path in (tmp_path / "cache" / "kernels").iterdir()] == [first.path.name]
    load_panel_kernel.cache_clear()  # a new process: it must find the built file and not compile again

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    again, why_not = load_panel_kernel(folder)
    assert again is not None and again.path == first.path, why_not


def test_a_failed_build_is_a_reason_not_an_error(tmp_path):
    kernel, why_not = load_panel_kernel(str(tmp_path), "false")  # the CC setting: a "compiler" that exits 1
    assert kernel is None and why_not.startswith("building it failed: ") and "exited with 1" in why_not
    assert not any((tmp_path / "kernels").iterdir())  # no temporary file left behind


def test_a_named_compiler_missing_from_path_is_the_reason(tmp_path, monkeypatch):
    source = tmp_path / "cpu_kernel.c"  # no library built beside this copy
    source.write_bytes(cpu_kernel.SOURCE.read_bytes())
    monkeypatch.setattr(cpu_kernel, "SOURCE", source)
    assert load_panel_kernel(str(tmp_path / "cache"), "no-such-cc") == (
        None,
        "no C compiler (no-such-cc) on PATH to build it",
    )


def test_cpus_without_avx2_and_fma_are_named():
    assert unusable_reason({"sse4_2", "avx", "fma"}) == "the CPU lacks avx2"
    assert unusable_reason({"avx2"}) == "the CPU lacks fma"
    assert unusable_reason({"avx2", "fma", "avx512f"}) is None
    assert cpu_flags("processor : 0\nflags : fpu avx2 fma\n\nprocessor : 1\nflags : fpu avx2 fma\n") == {
        "fpu",
        "avx2",
        "fma",
    }


def test_another_architecture_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "aarch64")
    assert load_panel_kernel(str(tmp_path / "arm")) == (None, "the CPU is aarch64, not x86-64")


def test_a_library_built_beside_the_source_needs_no_compiler(tmp_path, monkeypatch):
    """The image's build stage runs cpu_kernel.py with a bare python3 (no torch) to build the library into
    serve/modeling/; the served image has no compiler and loads that file."""
    source = tmp_path / "models" / "cpu_kernel.c"
    source.parent.mkdir()
    source.write_bytes(cpu_kernel.SOURCE.read_bytes())
    script = (
        "import runpy, sys; sys.argv = ['cpu_kernel.py', sys.argv[1]];"
        f"runpy.run_path({str(cpu_kernel.__file__)!r}, run_name='__main__');"
        "assert 'torch' not in sys.modules, 'the build stage has no torch'"
    )
    built = subprocess.run(
        [sys.executable, "-c", script, str(source.parent)], capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(source.parent / cpu_kernel.library_name())
    monkeypatch.setattr(cpu_kernel, "SOURCE", source)
    kernel, why_not = load_panel_kernel(str(tmp_path / "empty-cache"), "no-such-cc")
    assert kernel is not None and kernel.path == source.parent / cpu_kernel.library_name(), why_not
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="the CPU has no AVX-512F")
@pytest.mark.parametrize("out_features", [16, 40, 300])  # one panel, an odd count of panels, many
@pytest.mark.parametrize("rows", [2, 8, 9, 21])
def test_the_avx512_tile_gives_the_avx2_tiles_bits(kernel, out_features, rows):
    """Steps of two or more rows take the AVX-512F tile: the same bits as the AVX2 tile, bias included."""
    weight, x, b = operands(out_features, 72, rows, bias=True)
    panels = kernel.pack(weight)
    assert kernel.wide
    wide = kernel.linear(x, panels, b, out_features)
    kernel.wide = False
    try:
        narrow = kernel.linear(x, panels, b, out_features)
    finally:
        kernel.wide = True
    assert torch.equal(wide, narrow)
