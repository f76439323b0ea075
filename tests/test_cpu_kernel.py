"""The one-pass CPU fake-quant kernel: bit for bit the tensor-op path, where it applies, and a
clean fallback where it does not or cannot be built."""

from __future__ import annotations

import math

import pytest
import torch

from qat.quant import cpu_kernel
from qat.quant import functional as F

# the kernel needs a C compiler (every machine kind of this project has gcc); without one the
# tensor-op path runs, which the fallback test below covers
needs_cc = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler")


def _both_paths(x: torch.Tensor, scale: torch.Tensor, zp, qmin: int, qmax: int, clip: bool,
                monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """(output, input gradient, round-only output) with the kernel on, then off."""
    out = []
    for env in ("1", "0"):
        monkeypatch.setenv("QAT_CPU_KERNEL", env)
        xx = x.clone().requires_grad_()
        y = F._FakeQuantSTE.apply(xx, scale, zp, qmin, qmax, clip)
        y.backward(torch.linspace(-1, 2, y.numel()).reshape(y.shape))
        out.append((y.detach(), xx.grad, F._RoundSTE.apply(x, scale)))
    return out


def _same(u: torch.Tensor, v: torch.Tensor) -> bool:
    """Equal bit for bit: NaN where NaN, the sign of zeros included."""
    return (torch.equal(u.isnan(), v.isnan()) and torch.equal(u.signbit(), v.signbit())
            and torch.equal(torch.nan_to_num(u), torch.nan_to_num(v)))


def _compare(x, scale, zp, threads: int, monkeypatch):
    """(kernel results, tensor-op results, the kernel's answers) with ``threads`` threads."""
    calls = []
    real = cpu_kernel.fake_quant
    monkeypatch.setattr(cpu_kernel, "fake_quant",
                        lambda *a, **k: calls.append(r := real(*a, **k)) or r)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        on, off = _both_paths(x, scale, zp, -128, 127, True, monkeypatch)
    finally:
        torch.set_num_threads(old)
    for u, v in zip(on, off, strict=True):
        assert _same(u, v)
    assert (on[1] == 0).any() and (on[1] != 0).any()  # some values clipped, some not
    return on, off, calls


SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0]


def _input(shape, seed: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL)
    # exact halfway points (k + 0.5) * s: round half to even decides them
    k = min(64, flat.numel() - len(SPECIAL))
    flat[len(SPECIAL): len(SPECIAL) + k] = (torch.arange(k) - k / 2 + 0.5) * scale
    return x


@needs_cc
@pytest.mark.parametrize("shape", [(7,), (33, 301), (333, 1001)], ids=str)
@pytest.mark.parametrize(("per_row", "zp_kind"), [(False, "none"), (False, "number"),
                                                  (True, "none"), (True, "number"), (True, "rows")])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_bit_exact_with_tensor_ops(shape, per_row, zp_kind, threads, monkeypatch):
    """Values, clipped-STE gradients and the round-only path, NaN / inf / -0 / halfway points
    included; (333, 1001) splits rows between threads."""
    assert cpu_kernel.available()
    x = _input(shape, seed=len(shape) * 10 + threads)
    rows = [-1] + [1] * (len(shape) - 1)
    scale = (torch.tensor(0.02) if not per_row
             else (torch.rand(shape[0]) * 0.05 + 1e-3).reshape(rows))
    zp = {"none": None, "number": 3.0,
          "rows": torch.randint(-5, 6, (shape[0],)).float().reshape(rows)}[zp_kind]
    _, _, calls = _compare(x, scale, zp, threads, monkeypatch)
    assert calls and calls[0] is not None  # the kernel ran (it returns None where it does not)


@needs_cc
@pytest.mark.parametrize("zp", [None, 3.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_strided_views_are_read_as_they_lie(zp, threads, monkeypatch):
    """A permuted view with a storage offset (attention heads: (B, L, H, D) -> (B, H, L, D)):
    the kernel's contiguous output and mask equal the tensor ops' bit for bit."""
    base = _input((3, 70, 4, 48), seed=threads)  # 40320 elements: two threads split it
    x = base.transpose(1, 2)[:, 1:]  # (3, 3, 70, 48), offset 48, last dim contiguous
    assert not x.is_contiguous() and x.storage_offset() > 0
    _, _, calls = _compare(x, torch.tensor(0.02), zp, threads, monkeypatch)
    assert calls and calls[0] is not None and calls[0][0].is_contiguous()


@needs_cc
def test_kernel_declines_what_it_does_not_cover(monkeypatch):
    """None (the tensor-op path runs) for a strided last dim, per-row scales on a strided view,
    float64, non-leading-axis scales, empty tensors and when switched off; a result for the
    covered layouts."""
    x = torch.randn(6, 10)
    s = torch.tensor(0.1)
    assert cpu_kernel.fake_quant(x, s, -8, 7, mask=True) is not None
    assert cpu_kernel.fake_quant(x, torch.rand(6, 1) + 0.1, -8, 7, mask=False) is not None
    assert cpu_kernel.fake_quant(x.t(), s, -8, 7, mask=True) is None  # last dim strided
    heads = torch.randn(2, 5, 3, 4).transpose(1, 2)  # last dim contiguous, one scale: taken
    assert cpu_kernel.fake_quant(heads, s, -8, 7, mask=True) is not None
    assert cpu_kernel.fake_quant(heads, torch.rand(2, 1, 1, 1) + 0.1, -8, 7, mask=True) is None
    assert cpu_kernel.fake_quant(x.double(), s, -8, 7, mask=True) is None
    assert cpu_kernel.fake_quant(x, torch.rand(1, 10) + 0.1, -8, 7, mask=True) is None  # axis 1
    assert cpu_kernel.fake_quant(x[:0], s, -8, 7, mask=True) is None
    bad_bounds = torch.zeros(3)  # neither one bound nor one per row
    assert cpu_kernel.fake_quant(x, torch.rand(6, 1) + 0.1, bad_bounds, 7, mask=True) is None
    monkeypatch.setenv("QAT_CPU_KERNEL", "0")
    assert not cpu_kernel.enabled() and cpu_kernel.fake_quant(x, s, -8, 7, mask=True) is None


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """The kernel module as if never loaded, building into an empty cache folder."""
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_failed", False)
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path))
    return tmp_path


@needs_cc
def test_build_is_cached_and_keyed_by_flags(fresh_kernel):
    assert cpu_kernel.available()
    built = sorted((fresh_kernel / "kernels").glob("fake_quant-*.so"))
    assert len(built) == 1 and not list((fresh_kernel / "kernels").glob("tmp*"))
    mtime = built[0].stat().st_mtime_ns
    cc = cpu_kernel._compiler()
    assert cpu_kernel._build(cc) == built[0] and built[0].stat().st_mtime_ns == mtime  # reused
    keys = {cpu_kernel.library_path(cc, f) for f in cpu_kernel.FLAG_SETS}
    assert len(keys) == len(cpu_kernel.FLAG_SETS)


def test_a_flag_set_that_failed_is_not_tried_again(fresh_kernel, tmp_path):
    """A compiler that rejects -march=native: the first process builds with the next flags; a
    later one goes straight to that library, without calling the compiler."""
    log = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n"  # '-o FILE' is always the last two arguments here
                  f'echo "$*" >> {log}\n'
                  'case "$*" in *-march=native*) echo "error: bad -march" >&2; exit 1;; esac\n'
                  'for a; do out=$a; done; : > "$out"\n')
    cc.chmod(0o755)
    first = cpu_kernel._build(str(cc))
    assert first == cpu_kernel.library_path(str(cc), cpu_kernel.FLAG_SETS[1])
    assert len(log.read_text().splitlines()) == 2
    assert cpu_kernel._build(str(cc)) == first  # a new process: no compiler call at all
    assert len(log.read_text().splitlines()) == 2


@needs_cc
def test_no_compiler_or_a_failed_build_falls_back_with_one_warning(fresh_kernel, monkeypatch,
                                                                    tmp_path):
    broken = tmp_path / "fake_quant.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", broken)
    x = (torch.randn(20, 30) * 3).requires_grad_()
    s = torch.tensor(0.05)
    with pytest.warns(RuntimeWarning, match="could not be built") as rec:
        y = F._FakeQuantSTE.apply(x, s, None, -8, 7, True)
        F._FakeQuantSTE.apply(x, s, None, -8, 7, True)  # no second warning
    assert len(rec) == 1 and "error" in str(rec[0].message)
    assert not cpu_kernel.available()
    monkeypatch.setenv("QAT_CPU_KERNEL", "0")
    assert torch.equal(y, F._FakeQuantSTE.apply(x, s, None, -8, 7, True))
    assert not list((fresh_kernel / "kernels").glob("*.so"))  # no half-built file left

    monkeypatch.setenv("QAT_CPU_KERNEL", "1")
    monkeypatch.setattr(cpu_kernel, "_failed", False)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not cpu_kernel.available()
