"""The native CPU kernels (qvpo/native): exact Mish and the sampler's fused layers against torch
in float64; how torch's extension machinery builds, caches and loads them as torch.library ops;
when they are on by default; their fallbacks (torch ops; a temporary build directory)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from qvpo import native
from qvpo.nets import mish


@pytest.fixture(scope="module")
def kernels():
    """The kernels built and loaded, whatever the default here: their numerics are checked on
    every machine that can build them. Skipped only where torch's builder has no C++ compiler or
    no ninja; anywhere else a failed build fails the test."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja: torch cannot build the kernels here (torch ops are used)")
    return native.load()


@pytest.fixture
def unloaded(monkeypatch):
    """library() as if not asked yet in this process: it decides again (on, off, build)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)


@pytest.fixture
def on(kernels, monkeypatch, unloaded):
    """The kernels on in this process (QVPO_NATIVE=1), as on a machine where they are the default."""
    monkeypatch.setenv("QVPO_NATIVE", "1")
    assert native.library() is not None


def test_kernels_are_torch_library_ops_built_by_cpp_extension(kernels):
    built = kernels
    assert built.name == "qvpo_native.so" and built.exists()
    assert {"build.ninja", "ops.cpp", "sampler.c", "sampler.h"} <= {p.name for p in built.parent.iterdir()}
    schema = str(torch.ops.qvpo_native.first_layer_mish.default._schema)
    assert "Tensor(a!) out" in schema  # declared as writing `out`, so torch knows what it mutates
    assert torch.ops.qvpo_native.fused_available(False) in (True, False)
    # torch's dispatcher: a CPU kernel only; the op's own checks refuse what the C code would misread
    with pytest.raises(NotImplementedError, match="Meta"):
        torch.ops.qvpo_native.mish_out(torch.empty(4, device="meta"), torch.empty(4, device="meta"))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.qvpo_native.mish(torch.randn(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.qvpo_native.mish(torch.randn(4, 4).t())
    assert native.load() == built  # once per process


def test_on_by_default_exactly_where_measured_faster():
    avx512 = {"avx2", "avx512f", "avx512bw", "avx512vl"}
    assert native.default_on("Linux", "x86_64", avx512)[0]
    on, why = native.default_on("Linux", "x86_64", {"avx2", "fma"})  # no AVX-512: per-layer kernels only
    assert not on and "without AVX-512" in why and "QVPO_NATIVE=1" in why
    assert not native.default_on("Linux", "x86_64", {"avx512f"})[0]  # the fused sampler needs AVX512BW too
    assert not native.default_on("Darwin", "arm64", set())[0]
    assert not native.default_on("Darwin", "x86_64", avx512)[0]
    assert not native.default_on("Linux", "aarch64", {"fp", "asimd", "sve"})[0]


def test_qvpo_native_overrides_the_default(monkeypatch):
    monkeypatch.setattr(native, "default_on", lambda *a: (False, "off by default here"))
    monkeypatch.delenv("QVPO_NATIVE", raising=False)
    assert native.enabled() == (False, "off by default here")
    monkeypatch.setenv("QVPO_NATIVE", "1")
    assert native.enabled()[0]
    monkeypatch.setattr(native, "default_on", lambda *a: (True, "on by default here"))
    monkeypatch.setenv("QVPO_NATIVE", "0")
    assert not native.enabled()[0]
    monkeypatch.setenv("QVPO_NATIVE", "auto")
    assert native.enabled() == (True, "on by default here")


def test_off_by_default_means_torch_ops(monkeypatch, unloaded):
    monkeypatch.delenv("QVPO_NATIVE", raising=False)
    monkeypatch.setattr(native, "default_on", lambda *a: (False, "off by default on Plan9 mips"))
    assert native.library() is None and not native.usable(torch.randn(3))
    assert native.describe() == "torch ops: off by default on Plan9 mips"


def test_describe_names_the_path_and_why(on):
    line = native.describe()
    assert "\n" not in line and "QVPO_NATIVE=1" in line and str(native._loaded.parent) in line
    assert line.startswith("native fused" if native.fused_usable(False) else "native (per-layer")


@pytest.mark.usefixtures("kernels")
def test_mish_matches_the_definition_in_float64():
    x = torch.cat([torch.linspace(-100, 100, 200_001), torch.randn(100_003) * 5,
                   torch.tensor([-1e30, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-30, 19.9, 20.0, 20.1, 1e25, 3e38])])
    ref = x.double() * torch.tanh(F.softplus(x.double()))
    got = native.mish(x).double()
    # float32 rounding of a handful of ops: relative 1e-6 where |Mish| >= 1, absolute below
    assert ((got - ref).abs() / ref.abs().clamp(min=1.0)).max() < 1e-6
    assert torch.equal(native.mish(x[-3:]), x[-3:])  # large x: Mish(x) = x exactly, no overflow
    out = native.mish(torch.tensor([float("nan"), float("inf"), 1.0]))
    assert out[0].isnan() and out[1] == float("inf")  # a NaN is never hidden from the divergence check


@pytest.mark.usefixtures("on")
def test_mish_in_place_and_the_module_path_use_the_kernel():
    x = torch.randn(37, 53)
    ref = F.mish(x.double()).float()
    y = x.clone()
    assert native.mish(y, out=y) is y and torch.allclose(y, ref, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(mish(x), ref, atol=1e-6, rtol=1e-6)
    w, w_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    mish(w).sum().backward()  # under autograd: F.mish, whose backward gives the gradient
    F.mish(w_ref).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.usefixtures("on")
def test_mish_backward_matches_float64_autograd():
    x = torch.cat([torch.linspace(-30, 30, 60_001), torch.randn(70_001) * 4,
                   torch.tensor([-1e30, -100.0, -87.5, -1e-3, 0.0, 1e-30, 19.9, 20.0, 20.5, 1e25])])
    g = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    (x64 * torch.tanh(F.softplus(x64)) * g.double()).sum().backward()
    got = native.mish_backward(x, g).double()
    assert torch.isfinite(got).all()
    assert native.mish_backward(torch.tensor([float("nan")]), torch.ones(1)).isnan().all()
    # float32 rounding of the derivative (|Mish'| <= 1.1): 2e-6 relative to |g| (1 + |x| for tiny slopes)
    assert ((got - x64.grad).abs() <= 2e-6 * g.double().abs() * (1 + x.double().abs().clamp(max=30))).all()
    # through autograd: the module path under training runs the op qvpo_native::mish, whose
    # gradient (registered with torch.library) is this backward
    w = x[:5000].clone().requires_grad_()
    y = mish(w)
    assert y.grad_fn is not None and "qvpo_native" in type(y.grad_fn).__name__.lower() + y.grad_fn.name()
    y.backward(g[:5000])
    torch.testing.assert_close(w.grad, native.mish_backward(x[:5000].contiguous(), g[:5000].contiguous()))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("H", [256, 40, 7])  # vector multiples, a masked tail, less than a vector
def test_first_layer_and_bias_mish_match_torch(H):
    g = torch.Generator().manual_seed(0)
    N, S, n, A = 2, 5, 3, 4
    x = torch.randn(N, S * n, A, generator=g)
    W = torch.randn(N, A + 8 + 6, H, generator=g)       # W_a is a view: seed stride (A+8+6) H
    W_a = W.split([A, 8, 6], dim=1)[0]
    state_part = torch.randn(N, S + 3, H, generator=g)[:, 3:]  # a slice: seed stride (S + 3) H
    step_part = torch.randn(N, 7, H, generator=g)[:, 4]  # a step's row: seed stride 7 H
    out = torch.empty(N, S * n, H)
    native.first_layer_mish(x, W_a, state_part, step_part, out)
    pre = (torch.bmm(x.double(), W_a.double()) + state_part.double().repeat_interleave(n, dim=1)
           + step_part.double()[:, None])
    torch.testing.assert_close(out.double(), F.mish(pre), rtol=1e-6, atol=1e-6)

    h = torch.randn(N, 11, H, generator=g)
    bias = torch.randn(N, 1, H, generator=g)
    expected = F.mish(h.double() + bias.double())
    torch.testing.assert_close(native.bias_mish(h, bias).double(), expected, rtol=1e-6, atol=1e-6)
    assert native.bias_mish(h, bias, out=h) is h  # in place
    torch.testing.assert_close(h.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("H,A", [(256, 3), (40, 17), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_mish_out_is_the_last_hidden_layer_and_the_output_layer(H, A, dtype):
    g = torch.Generator().manual_seed(1)
    N, R = 2, 9
    x = torch.randn(N, R, H, generator=g).to(dtype)
    bias = torch.randn(N, 1, H, generator=g)
    W_out = torch.randn(N, H, A, generator=g)
    b_out = torch.randn(N, 1, A, generator=g)
    out = torch.empty(N, R, A)
    native.bias_mish_out(x, bias, W_out.transpose(1, 2).contiguous(), b_out, out)
    ref = torch.baddbmm(b_out.double(), F.mish(x.double() + bias.double()), W_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * H)  # float32 sums of H terms


@pytest.mark.usefixtures("kernels")
def test_bfloat16_outputs_are_mish_to_bfloat16_precision():
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(1, 33, 40, generator=g) * 4).bfloat16()
    bias = torch.randn(1, 1, 40, generator=g)
    got = native.bias_mish(h, bias, out=torch.empty(1, 33, 40, dtype=torch.bfloat16)).double()
    ref = F.mish(h.double() + bias.double())
    # rounding to bfloat16 (half an ulp: 2^-8 relative) plus the kernel's approximation (< 1.2e-4)
    assert ((got - ref).abs() <= 2.0 ** -8 * ref.abs() + 1.2e-4 * ref.abs() + 1e-6).all()
    # and the rounding is to nearest, not truncation: errors on both sides, about half an ulp
    assert (got > ref).any() and (got < ref).any()


@pytest.mark.usefixtures("kernels")
def test_wrappers_refuse_layouts_the_kernels_would_misread():
    x, out = torch.randn(2, 5, 8), torch.empty(2, 5, 3)
    W_t = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="bad bias"):  # (1, N, H): seed 1's bias would be read past the end
        native.bias_mish_out(x, torch.randn(1, 2, 8), W_t, torch.randn(2, 1, 3), out)
    with pytest.raises(ValueError, match="own"):  # out aliasing x (restrict in C)
        y = torch.randn(2, 5, 8)
        native.first_layer_mish(y, torch.randn(2, 8, 8), torch.randn(2, 5, 8), torch.randn(2, 8), y)
    hidden = [(torch.randn(2, 32, 32), torch.randn(2, 32))]
    with pytest.raises(ValueError, match="multiple of states"):  # 10 rows for 3 states
        native.sample_fused(torch.randn(2, 3, 10, 2), torch.randn(2, 3, 32), torch.randn(2, 3, 32),
                            torch.randn(2, 2, 32), hidden, torch.randn(2, 2, 32), torch.randn(2, 2),
                            torch.randn(3, 5), True, False)
    with pytest.raises(ValueError, match="needs rows"):  # no rows: nothing for the C code to divide into blocks
        native.sample_fused(torch.randn(2, 3, 0, 2), torch.randn(2, 0, 32), torch.randn(2, 3, 32),
                            torch.randn(2, 2, 32), hidden, torch.randn(2, 2, 32), torch.randn(2, 2),
                            torch.randn(3, 5), True, False)
    with pytest.raises(ValueError, match="first-layer bias"):  # (1, N*H): seed 1's bias past the end
        native.mlp_fused(torch.randn(2, 6, 2), torch.randn(2, 3, 32), torch.randn(1, 64), torch.randn(2, 2, 32),
                         hidden, torch.randn(2, 1, 32), torch.randn(2, 1), False)
    with pytest.raises(ValueError, match="unsupported widths"):  # 40 is not a multiple of 32
        native.mlp_fused(torch.randn(2, 6, 2), torch.randn(2, 3, 40), torch.randn(2, 40), torch.randn(2, 2, 40),
                         [(torch.randn(2, 40, 40), torch.randn(2, 40))], torch.randn(2, 1, 40), torch.randn(2, 1), False)


def test_qvpo_native_0_turns_the_kernels_off(monkeypatch, unloaded):
    monkeypatch.setenv("QVPO_NATIVE", "0")
    assert native.library() is None
    with torch.no_grad():
        torch.testing.assert_close(mish(torch.linspace(-5, 5, 101)), F.mish(torch.linspace(-5, 5, 101)))


def test_a_directory_that_cannot_be_written_is_detected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert native._not_writable(blocker / "cache") is not None  # under a file: fails for root too
    assert native._not_writable(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert native._not_writable(ro) is not None


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    lock = tmp_path / "lock"  # torch's builder would wait for it to go, without end
    lock.write_text("")
    native._clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running now
    old = lock.stat().st_mtime - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        native._clear_stale_lock(tmp_path)
    assert not lock.exists()


def _python(code: str, env: dict, tmp_path) -> subprocess.CompletedProcess:
    """code in a fresh interpreter (a process loads the ops once: a second copy cannot register)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, **env})


def test_unwritable_cache_builds_in_a_temporary_directory_and_says_so(kernels, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # the temporary directory the fallback picks is linked to the build this test session already
    # has, so the check costs a load, not a compile (and shows that a cached build is not redone)
    os.symlink(kernels.parent.parent, tmp / f"qvpo-native-{os.getuid()}")
    before = kernels.stat().st_mtime_ns
    proc = _python("""
        import warnings
        from qvpo import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(native.describe())
        print(*[w.message for w in caught], sep="\\n")
    """, {"QVPO_CACHE_DIR": str(blocker / "cache"), "TMPDIR": str(tmp), "QVPO_NATIVE": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    describe, *warned = proc.stdout.strip().splitlines()
    assert describe.startswith("native") and "not writable" in describe
    assert len(warned) == 1 and "not writable" in warned[0] and str(tmp) in warned[0]
    assert kernels.stat().st_mtime_ns == before  # found built: torch's builder had nothing to do


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    proc = _python("""
        import warnings
        import torch
        from qvpo import native
        from qvpo.diffusion import DiffusionPolicy
        from qvpo.rng import init_generators
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None and native.library() is None
            a = DiffusionPolicy(3, 2, init_generators([0]), T=3).sample(torch.randn(1, 4, 3), 5)
        assert a.shape == (1, 4, 5, 2) and a.abs().max() <= 1
        print(sum("native sampler kernels unavailable" in str(w.message) for w in caught))
        print(native.describe())
    """, {"QVPO_CACHE_DIR": str(tmp_path / "cache"), "CXX": "false", "QVPO_NATIVE": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned, describe = proc.stdout.strip().splitlines()[-2:]
    assert warned == "1"  # warned once, not at every call
    assert describe.startswith("torch ops: the native kernels did not build")
