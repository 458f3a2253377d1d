"""Native CPU kernels for the diffusion sampler: Mish, the first layer fused with it, and the
whole sampler in one call (`sample_fused`: float32 on AVX-512 CPUs, bfloat16 on AMX CPUs).

`sampler.c` is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for this
CPU (-O3 -march=native, OpenMP when the compiler has it) into a per-user cache
(`$QVPO_CACHE_DIR`, else ~/.cache/qvpo), keyed by the source, the flags, the compiler and the
CPU, and loaded with ctypes: no build step at install time, and no torch headers. Where no
compiler works, `library()` returns None with one warning and the sampler uses torch ops (same
maths, slower). `QVPO_NATIVE=0` turns the kernels off.

Why: on CPU an exact Mish in torch ops is several passes over memory with fresh allocations and
costs about as much as the matmuls that feed it (docs/paper-notes.md#cost); here each
element is read once and written once while it is in cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from qvpo.errors import one_line

SOURCE = Path(__file__).with_name("sampler.c")
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("QVPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qvpo")
    return Path(root) / "native"


def _cpu_id() -> str:
    """What -march=native depends on: a cache shared between machines must not mix them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _flag_sets() -> list[list[str]]:
    """Flag sets to try, fastest first (a compiler may lack -march=native, the vector-width
    hint or OpenMP; without OpenMP the kernels run on one thread)."""
    base = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-math-errno", "-fno-trapping-math"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    tuned = ["-march=native"] + (["-mprefer-vector-width=512"] if x86 else [])
    march = ["-march=native"]
    sets = [base + tuned + ["-fopenmp"], base + march + ["-fopenmp"], base + tuned, base + march,
            base + ["-fopenmp"], base]
    return [f for i, f in enumerate(sets) if f not in sets[:i]]


def _build() -> Path:
    cc = shlex.split(os.environ.get("CC", "cc"))  # e.g. CC="ccache gcc"
    if not cc or shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler {os.environ.get('CC', 'cc')!r} on PATH (set $CC)")
    source = SOURCE.read_bytes()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    targets = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        targets.append((flags, _cache_dir() / f"sampler-{key}.so"))
    for _, target in targets:  # a build made earlier with any flag set: no compiler run at all
        if target.exists():
            return target
    errors = []
    for flags, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        # build to a temporary name, then rename: concurrent sweep workers never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.chmod(tmp, 0o755)  # readable by others sharing the cache (mkstemp makes it 0600)
                os.replace(tmp, target)
                return target
            errors.append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cc)} could not build {SOURCE.name}: {errors[-1]}")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, QVPO_NATIVE=0): callers fall back to torch."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("QVPO_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use torch ops
        warnings.warn(f"qvpo: native sampler kernels unavailable ({one_line(e)}); the sampler "
                      "uses torch ops (same maths, slower on CPU)", RuntimeWarning, stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qvpo_mish.argtypes = [ptr, ptr, i64, ctypes.c_int]
    lib.qvpo_mish.restype = None
    lib.qvpo_mish_backward.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
    lib.qvpo_mish_backward.restype = None
    lib.qvpo_first_layer_mish.argtypes = [ptr] * 5 + [i64] * 8 + [ctypes.c_int] * 2
    lib.qvpo_first_layer_mish.restype = None
    lib.qvpo_bias_mish.argtypes = [ptr, ptr, ptr] + [i64] * 4 + [ctypes.c_int] * 2
    lib.qvpo_bias_mish.restype = None
    lib.qvpo_bias_mish_out.argtypes = [ptr] * 5 + [i64] * 7 + [ctypes.c_int] * 2
    lib.qvpo_bias_mish_out.restype = None
    lib.qvpo_amx_init.argtypes = []
    lib.qvpo_amx_init.restype = ctypes.c_int
    lib.qvpo_fused_available.argtypes = [ctypes.c_int]
    lib.qvpo_fused_available.restype = ctypes.c_int
    lib.qvpo_sample_fused.argtypes = [ptr] * 10 + [i64] * 9 + [ctypes.c_int] * 3
    lib.qvpo_sample_fused.restype = ctypes.c_int
    lib.qvpo_mlp_fused.argtypes = [ptr] * 9 + [i64] * 10 + [ctypes.c_int] * 2
    lib.qvpo_mlp_fused.restype = ctypes.c_int
    _lib = lib
    return _lib


_OUT_DTYPES = (torch.float32, torch.bfloat16)


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor (CPU, float32) and are built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def _check(cond: bool, what: str) -> None:
    if not cond:  # a programming error in the caller, never user input
        raise ValueError(f"qvpo.native: {what}")


def _check_first_layer(what: str, R: int, W_a: torch.Tensor, state_part: torch.Tensor, N: int, A: int,
                       H: int) -> None:
    """The first layer's row part W_a (N, A, H) and shared part (N, S, H): views whose rows are
    contiguous (any seed stride), R a multiple of S."""
    S = state_part.shape[1]
    _check(S >= 1 and R % S == 0, f"{what}: rows must be a multiple of states")
    for t, shape in ((W_a, (N, A, H)), (state_part, (N, S, H))):
        _check(t.shape == shape and t.stride(2) == 1 and (shape[1] == 1 or t.stride(1) == H),
               f"{what}: bad {tuple(t.shape)}")


def mish(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mish of a contiguous CPU float32 tensor into `out` (a new tensor if None; may be x)."""
    _check(x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu",
           "mish needs a contiguous CPU float32 tensor")
    out = torch.empty_like(x) if out is None else out
    _check(out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
           "mish: bad out")
    library().qvpo_mish(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * Mish'(x) for contiguous CPU float32 tensors of one shape (a new tensor)."""
    _check(x.is_contiguous() and grad.is_contiguous() and x.shape == grad.shape
           and x.dtype == grad.dtype == torch.float32 and x.device.type == grad.device.type == "cpu",
           "mish_backward needs contiguous CPU float32 x and grad of one shape")
    out = torch.empty_like(x)
    library().qvpo_mish_backward(x.data_ptr(), grad.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


class MishFunction(torch.autograd.Function):
    """Mish with the native forward and backward (CPU float32, first-order gradients)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return mish(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return mish_backward(x, grad.contiguous())


def first_layer_mish(x: torch.Tensor, W_a: torch.Tensor, state_part: torch.Tensor,
                     step_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = Mish(x @ W_a + state_part[row's state] + step_part), per seed.

    x (N, R, A) contiguous; W_a (N, A, H); state_part (N, S, H) with R = S * rows per state;
    step_part (N, H); out (N, R, H) contiguous, float32 or bfloat16 (computed in float32,
    rounded once). Each of W_a, state_part, step_part may be a view (any seed stride) whose rows
    are contiguous; all but `out` are float32.
    """
    N, R, A = x.shape
    H = W_a.shape[-1]
    S = state_part.shape[1]
    _check(x.is_contiguous() and out.is_contiguous() and out.shape == (N, R, H) and out.data_ptr() != x.data_ptr(),
           "first_layer_mish: bad x or out (out must be a tensor of its own)")
    _check_first_layer("first_layer_mish", R, W_a, state_part, N, A, H)
    _check(step_part.shape == (N, H) and step_part.stride(1) == 1, "first_layer_mish: bad step part")
    for t in (x, W_a, state_part, step_part):
        _check(t.dtype == torch.float32 and t.device.type == "cpu", "first_layer_mish: CPU float32 inputs only")
    _check(out.dtype in _OUT_DTYPES and out.device.type == "cpu", "first_layer_mish: out must be CPU float32 or bfloat16")
    library().qvpo_first_layer_mish(x.data_ptr(), W_a.data_ptr(), state_part.data_ptr(),
                                    step_part.data_ptr(), out.data_ptr(), N, R, A, H, R // S,
                                    W_a.stride(0), state_part.stride(0), step_part.stride(0),
                                    int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def bias_mish(x: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = Mish(x + bias), per seed: x (N, R, H) contiguous, float32 or bfloat16 (then out is
    too; computed in float32); bias float32 (N, 1, H) or (N, H) with contiguous rows; out
    defaults to a new tensor and may be x."""
    N, R, H = x.shape
    out = torch.empty_like(x) if out is None else out
    _check(x.is_contiguous() and out.is_contiguous() and out.shape == x.shape, "bias_mish: bad x or out")
    _check(bias.shape[0] == N and bias.shape[-1] == H and bias.numel() == N * H and bias.stride(-1) == 1,
           f"bias_mish: bad bias {tuple(bias.shape)}")
    _check(x.dtype in _OUT_DTYPES and out.dtype == x.dtype and bias.dtype == torch.float32
           and x.device.type == out.device.type == bias.device.type == "cpu",
           "bias_mish: CPU x and out both float32 or both bfloat16, bias float32")
    library().qvpo_bias_mish(x.data_ptr(), bias.data_ptr(), out.data_ptr(), N, R, H, bias.stride(0),
                             int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out


MAX_OUT = 32  # bias_mish_out keeps one accumulator register per output column


def bias_mish_out(x: torch.Tensor, bias: torch.Tensor, W_out_t: torch.Tensor, b_out: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """out = Mish(x + bias) @ W_out_t^T + b_out, per seed, without writing Mish(x + bias).

    x (N, R, H) contiguous, float32 or bfloat16 (computed in float32); bias float32 (N, 1, H) or
    (N, H); W_out_t float32 (N, A, H) with contiguous rows, A <= MAX_OUT; b_out float32 (N, 1, A)
    or (N, A); out float32 (N, R, A) contiguous.
    """
    N, R, H = x.shape
    A = W_out_t.shape[1]
    _check(A <= MAX_OUT and W_out_t.shape == (N, A, H) and W_out_t.stride(2) == 1 and (A == 1 or W_out_t.stride(1) == H),
           f"bias_mish_out: bad W_out_t {tuple(W_out_t.shape)} (at most {MAX_OUT} outputs)")
    _check(x.is_contiguous() and x.dtype in _OUT_DTYPES, "bias_mish_out: bad x")
    _check(out.is_contiguous() and out.shape == (N, R, A) and out.dtype == torch.float32, "bias_mish_out: bad out")
    for b, width in ((bias, H), (b_out, A)):
        _check(b.shape[0] == N and b.shape[-1] == width and b.numel() == N * width and b.stride(-1) == 1,
               f"bias_mish_out: bad bias {tuple(b.shape)}")
    for t in (x, bias, W_out_t, b_out, out):
        _check(t.device.type == "cpu" and (t is x or t.dtype == torch.float32), "bias_mish_out: CPU float32 only")
    library().qvpo_bias_mish_out(x.data_ptr(), bias.data_ptr(), W_out_t.data_ptr(), b_out.data_ptr(),
                                 out.data_ptr(), N, R, H, A, bias.stride(0), W_out_t.stride(0),
                                 b_out.stride(0), int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out


_fused: dict[bool, bool] = {}


def fused_usable(bf16: bool) -> bool:
    """Whether `sample_fused` runs here in this precision: float32 on CPUs with AVX-512, bfloat16
    on CPUs with AMX-BF16 whose OS lets this process use AMX tiles (Linux grants them per
    process on request)."""
    if bf16 not in _fused:
        lib = library()
        _fused[bf16] = lib is not None and bool(lib.qvpo_fused_available(int(bf16)))
    return _fused[bf16]


FUSED_MAX_HIDDEN = 1024
# below this many rows a critic is scored layer by layer: the fused call's fixed costs (packing
# the weights, waking the threads) exceed what it saves (measured: 512 rows even, 1024 rows 1.8x)
FUSED_MLP_MIN_ROWS = 1024


def fused_shapes_ok(widths: list[int], action_dim: int) -> bool:
    """Whether `sample_fused` takes a denoiser of these hidden widths: all equal, a multiple of
    32 up to FUSED_MAX_HIDDEN, at least two of them (the first layer, one H x H layer), and at
    most MAX_OUT action dimensions."""
    H = widths[0]
    return (len(widths) >= 2 and all(w == H for w in widths) and H % 32 == 0 and H <= FUSED_MAX_HIDDEN
            and 1 <= action_dim <= MAX_OUT)


def packed_view(W: torch.Tensor, bf16: bool) -> torch.Tensor:
    """A hidden layer's weight (N, K, M) (x @ W) viewed in the order the fused kernels read it
    (copy it to make it contiguous). bf16: AMX's B operand, (N, K/2, M, 2), each pair of
    consecutive k side by side; float32: column panels (N, M/32, K, 32), each read front to back
    by the FMA kernel."""
    N, K, M = W.shape
    if bf16:
        return W.view(N, K // 2, 2, M).transpose(2, 3)
    return W.view(N, K, M // 32, 32).permute(0, 2, 1, 3)


def fused_ok(widths: list[int], action_dim: int, bf16: bool) -> bool:
    """Whether the fused calls take this network here: `fused_shapes_ok` and `fused_usable`."""
    return fused_shapes_ok(widths, action_dim) and fused_usable(bf16)


def _fused_network(what: str, R: int, W_a: torch.Tensor, state_part: torch.Tensor,
                   hidden: list[tuple[torch.Tensor, torch.Tensor]], W_out_t: torch.Tensor,
                   b_out: torch.Tensor, inputs: list[torch.Tensor], bf16: bool):
    """Checks and packs what both fused calls share: the first layer's parts, the hidden layers,
    the output layer (W_out_t (N, O, H), b_out with N * O values) and the other float32 inputs.
    Returns (packed hidden weights, their biases, W_out_t and b_out (N, O) contiguous)."""
    N, A, H = W_a.shape
    O = W_out_t.shape[1]
    _check(fused_shapes_ok([H] + [w.shape[-1] for w, _ in hidden], A) and 1 <= O <= MAX_OUT,
           f"{what}: unsupported widths")
    _check(R >= 1 and N >= 1, f"{what}: needs rows and seeds, got {R} rows, {N} seeds")
    _check_first_layer(what, R, W_a, state_part, N, A, H)
    _check(W_out_t.shape == (N, O, H) and b_out.numel() == N * O, f"{what}: bad output layer")
    for w, b in hidden:
        _check(w.shape == (N, H, H) and b.numel() == N * H, f"{what}: bad hidden layer")
    for t in [W_a, state_part, W_out_t, b_out, *inputs] + [t for layer in hidden for t in layer]:
        _check(t.dtype == torch.float32 and t.device.type == "cpu", f"{what}: CPU float32 inputs only")
    Wp, bias = _pack_hidden(hidden, N, H, bf16)
    return Wp, bias, W_out_t.contiguous(), b_out.reshape(N, O).contiguous()


def sample_fused(noise: torch.Tensor, state_part: torch.Tensor, step_part: torch.Tensor,
                 W_a: torch.Tensor, hidden: list[tuple[torch.Tensor, torch.Tensor]],
                 W_out_t: torch.Tensor, b_out: torch.Tensor, coefs: torch.Tensor,
                 clip_x0: bool, bf16: bool) -> torch.Tensor:
    """Every denoising step of the sampler in one call (see sampler.c): x_0 (N, R, A), before
    the final clamp. bf16: the hidden layers' matmuls in bfloat16 on AMX, as
    DiffusionPolicy.precision = 'bf16'; else float32.

    noise (N, T, R, A): x_T, then the noise of steps T-1 .. 1; state_part (N, S, H) with
    R = S * rows per state; step_part (N, T, H): the first layer's time part plus bias per step;
    W_a (N, A, H); hidden: the (weight (N, H, H), bias (N, 1, H) or (N, H)) of each hidden layer
    after the first, float32; W_out_t (N, A, H), b_out (N, A) or (N, 1, A): the output layer;
    coefs (T, 5): NoiseSchedule.step_coefs. Callers check `fused_ok`.
    """
    N, T, R, A = noise.shape
    H, S = W_a.shape[-1], state_part.shape[1]
    _check(T >= 1, f"sample_fused: needs rows, steps and seeds, got {tuple(noise.shape)}")
    _check(W_a.shape[:2] == (N, A), f"sample_fused: bad {tuple(W_a.shape)}")
    Wp, bias, W_out_t, b_out = _fused_network("sample_fused", R, W_a, state_part, hidden, W_out_t, b_out,
                                              [noise, step_part, coefs], bf16)
    _check(W_out_t.shape[1] == A and step_part.shape == (N, T, H) and coefs.shape == (T, 5),
           "sample_fused: bad step part, output layer or coefficients")
    noise, step_part, coefs = noise.contiguous(), step_part.contiguous(), coefs.contiguous()
    out = torch.empty(N, R, A, dtype=torch.float32)
    rc = library().qvpo_sample_fused(
        noise.data_ptr(), state_part.data_ptr(), step_part.data_ptr(), W_a.data_ptr(), Wp.data_ptr(),
        bias.data_ptr(), W_out_t.data_ptr(), b_out.data_ptr(), coefs.data_ptr(), out.data_ptr(),
        N, T, R, A, H, len(hidden), R // S, state_part.stride(0), W_a.stride(0), int(clip_x0), int(bf16),
        torch.get_num_threads())
    _fused_rc(rc, "sampler")
    return out


def _pack_hidden(hidden, N: int, H: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden layers as the fused kernels read them: packed weights (N, L, ...) and biases
    (N, L, H), each written once (a copy per layer: this runs at every sampler call)."""
    L = len(hidden)
    Wp = torch.empty((N, L) + packed_view(hidden[0][0], bf16).shape[1:],
                     dtype=torch.bfloat16 if bf16 else torch.float32)
    bias = torch.empty(N, L, H, dtype=torch.float32)
    for j, (w, b) in enumerate(hidden):
        Wp[:, j].copy_(packed_view(w.to(Wp.dtype), bf16))  # convert first: a strided conversion is slow
        bias[:, j].copy_(b.reshape(N, H))
    return Wp, bias


def _fused_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"qvpo.native: the fused {what} failed (code {rc}: "
                           f"{'not available here' if rc == -1 else 'out of memory'})")


def mlp_fused(x: torch.Tensor, state_part: torch.Tensor, b1: torch.Tensor, W_a: torch.Tensor,
              hidden: list[tuple[torch.Tensor, torch.Tensor]], W_out_t: torch.Tensor,
              b_out: torch.Tensor, bf16: bool) -> torch.Tensor:
    """A Mish MLP on [shared part, row part] in one call (see sampler.c), e.g. a critic's
    Q(s, a) for k candidate actions per state: out (N, R, O).

    x (N, R, A): each row's own input; state_part (N, S, H): the first layer's shared part
    (W_s s), row r uses r // (R / S); b1 (N, H) or (N, 1, H): the first layer's bias; W_a
    (N, A, H): its row part; hidden: (weight (N, H, H), bias) of the later hidden layers; W_out_t
    (N, O, H), b_out (N, O) or (N, 1, O): the output layer. bf16: hidden matmuls in bfloat16 on
    AMX. Callers check `fused_ok` (and O <= MAX_OUT)."""
    N, R, A = x.shape
    H, S = W_a.shape[-1], state_part.shape[1]
    _check(W_a.shape[:2] == (N, A), f"mlp_fused: bad {tuple(W_a.shape)}")
    Wp, bias, W_out_t, b_out = _fused_network("mlp_fused", R, W_a, state_part, hidden, W_out_t, b_out,
                                              [x, b1], bf16)
    _check(b1.shape[0] == N and b1.shape[-1] == H and b1.numel() == N * H and b1.stride(-1) == 1,
           f"mlp_fused: bad first-layer bias {tuple(b1.shape)}")
    x, O = x.contiguous(), W_out_t.shape[1]
    out = torch.empty(N, R, O, dtype=torch.float32)
    rc = library().qvpo_mlp_fused(
        x.data_ptr(), state_part.data_ptr(), b1.data_ptr(), W_a.data_ptr(), Wp.data_ptr(), bias.data_ptr(),
        W_out_t.data_ptr(), b_out.data_ptr(), out.data_ptr(), N, R, A, H, len(hidden), O, R // S,
        state_part.stride(0), b1.stride(0), W_a.stride(0), int(bf16), torch.get_num_threads())
    _fused_rc(rc, "MLP")
    return out
