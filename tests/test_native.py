"""The native CPU kernels (qvpo/native): exact Mish and the sampler's fused layers against torch
in float64, their fallback, and the build that makes them."""

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from qvpo import native
from qvpo.nets import mish

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels fall back to torch")


@needs_cc
def test_kernels_build_on_a_machine_with_a_compiler():
    # where a compiler exists the sampler must not silently fall back to the slow path
    assert native.library() is not None


@needs_cc
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


@needs_cc
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


@needs_cc
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
    # through autograd: the module path under training uses this backward
    w = x[:5000].clone().requires_grad_()
    mish(w).backward(g[:5000])
    torch.testing.assert_close(w.grad, native.mish_backward(x[:5000].contiguous(), g[:5000].contiguous()))


@needs_cc
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


@needs_cc
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


@needs_cc
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


@needs_cc
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


@pytest.fixture
def unloaded(monkeypatch):
    """The kernels as if never loaded in this process: the next library() builds or finds them."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)


@needs_cc
def test_a_fresh_build_is_readable_by_others_sharing_the_cache(tmp_path, monkeypatch, unloaded):
    monkeypatch.setenv("QVPO_CACHE_DIR", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "native").glob("sampler-*.so"))
    assert len(built) == 1 and built[0].stat().st_mode & 0o444 == 0o444
    assert not list((tmp_path / "native").glob("*.tmp"))  # no temporary left behind


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch, unloaded):
    from qvpo.diffusion import DiffusionPolicy
    from qvpo.rng import init_generators

    monkeypatch.setenv("QVPO_CACHE_DIR", str(tmp_path))  # no kernel built earlier to find
    monkeypatch.setenv("CC", "false")                      # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="native sampler kernels unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert native.library() is None
        pol = DiffusionPolicy(3, 2, init_generators([0]), T=3)
        a = pol.sample(torch.randn(1, 4, 3), 5)
    assert a.shape == (1, 4, 5, 2) and a.abs().max() <= 1


def test_qvpo_native_0_turns_the_kernels_off(monkeypatch, unloaded):
    monkeypatch.setenv("QVPO_NATIVE", "0")
    assert native.library() is None
    with torch.no_grad():
        torch.testing.assert_close(mish(torch.linspace(-5, 5, 101)), F.mish(torch.linspace(-5, 5, 101)))
