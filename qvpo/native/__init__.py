"""Native CPU kernels for the diffusion sampler: Mish, the first layer fused with it, and the
whole sampler in one call (`sample_fused`: float32 on AVX-512 CPUs, bfloat16 on AMX CPUs).

How they are built: `sampler.c` (the kernels: C that also compiles as C++) and `ops.cpp` (their
bindings, torch.library ops `torch.ops.qvpo_native.*` on CPU tensors) are compiled on first use by
torch's JIT extension builder, `torch.utils.cpp_extension.load`: torch's headers, compiler
(`$CXX`, else `c++`) and ninja (`pip install ninja` where there is none); its file lock when
several processes build at once; ninja's incremental rebuild. Flags: -O3 -march=native and OpenMP
(not on macOS), -ffp-contract=off. The build goes to `$QVPO_CACHE_DIR/native/<key>` (default
~/.cache/qvpo; the key is the sources, the flags, torch's version and install directory and the
CPU, so a cache shared between machines never mixes -march=native builds, nor two environments
their builds); where that directory is not writable, to one
under the system's temporary directory, said in one warning. Dispatch (CPU only) and the
gradient of `mish` are torch's (torch.library.register_autograd).

When they run: `enabled()` (QVPO_NATIVE=1 or 0, else `default_on`: x86-64 Linux with AVX-512,
where they were measured faster). When they are off, or fail to build (one warning), `library()`
returns None and the sampler uses torch ops: the same maths. `describe()` says which path runs
here and why (`make bench` prints it).

Why: on CPU an exact Mish in torch ops is several passes over memory with fresh allocations and
costs about as much as the matmuls that feed it (docs/paper-notes.md#cost); here each
element is read once and written once while it is in cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qvpo.errors import one_line

HERE = Path(__file__).parent
SOURCE = HERE / "sampler.c"
SOURCES = (HERE / "ops.cpp", SOURCE, HERE / "sampler.h")  # compiled: the first two; sampler.h is included
NAME = "qvpo_native"  # the extension, and the namespace of its ops (TORCH_LIBRARY in ops.cpp)
_lib = None            # torch.ops.qvpo_native once loaded and enabled, else None (see library())
_tried = False
# this process's load (a second copy of the ops could not be registered): the .so, and a note
# when it was built away from the cache (not writable)
_loaded: Path | None = None
_note: str | None = None
_why = ""              # why library() answers what it does (for describe)
_ops = torch.ops.qvpo_native  # the ops' namespace: resolves its names once the library is loaded


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_id() -> str:
    """What -march=native depends on: a cache shared between machines must not mix them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


# The default, stated once. The native path was measured faster than torch ops on x86-64 Linux
# CPUs with AVX-512 (`make bench`: test_qvpo_update_paper_settings, native, against
# test_qvpo_update_fast_modes[fp32-False-False-fp32], torch ops; docs/speed-results.md), where
# the whole sampler runs in one call (sampler.c needs AVX512F and AVX512BW for it). Nothing else
# was measured: without AVX-512 only the per-layer kernels exist (torch's matmuls, then portable C
# loops), macOS builds without OpenMP, no ARM machine was timed. There: torch ops, unless
# QVPO_NATIVE=1.
MEASURED_FASTER = "x86-64 Linux with AVX-512"


def default_on(system: str, machine: str, cpu_flags: set[str]) -> tuple[bool, str]:
    """Whether the kernels are on by default on this platform (platform.system(), .machine(),
    the CPU's flags), and why."""
    x86 = machine.lower() in ("x86_64", "amd64")
    if system == "Linux" and x86 and {"avx512f", "avx512bw"} <= cpu_flags:
        return True, (f"on by default on {MEASURED_FASTER}, where it was measured faster than torch ops "
                      "(QVPO_NATIVE=0 turns it off)")
    where = f"{system} {machine}" + (" without AVX-512" if x86 and system == "Linux" else "")
    return False, (f"off by default on {where}: measured faster only on {MEASURED_FASTER} "
                   "(QVPO_NATIVE=1 turns it on)")


def enabled() -> tuple[bool, str]:
    """Whether the kernels should run here, and why: QVPO_NATIVE=1 or 0 decides; unset (or
    'auto'), `default_on` for this machine."""
    value = os.environ.get("QVPO_NATIVE", "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True, f"on: QVPO_NATIVE={value}"
    if value in ("0", "false", "off", "no"):
        return False, f"off: QVPO_NATIVE={value}"
    return default_on(platform.system(), platform.machine(), _cpu_flags())


def _flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags. -ffp-contract=off: no multiply-add fused that the source does
    not write (the C99 build before this one had none either: the same rounding, the same bits)."""
    cflags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if platform.system() == "Darwin":  # Apple's clang has no OpenMP and not always -march=native
        return cflags, []
    cflags += ["-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        cflags.append("-mprefer-vector-width=512")
    return cflags, ["-fopenmp"]


def _cache_root() -> Path:
    root = os.environ.get("QVPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qvpo")
    return Path(root)


def _key(cflags: list[str]) -> str:
    """The build's cache key. torch's install directory is part of it: build.ninja names that
    torch's headers and libraries, so two environments sharing one build directory would each
    find the other's build stale and rebuild it, in turns, under each other's running processes."""
    h = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join(cflags).encode(), torch.__version__.encode(),
                 _cpu_id().encode(), str(Path(torch.__file__).resolve().parent).encode()]:
        h.update(part + b"\0")
    return f"torch{torch.__version__.split('+')[0]}-{h.hexdigest()[:16]}"


def _not_writable(d: Path) -> str | None:
    """None if files can be made in d (made if missing), else why not (one line)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
        return None
    except OSError as e:
        return f"{e.strerror or type(e).__name__}"


def build_dir(cflags: list[str]) -> tuple[Path, str | None]:
    """Where the kernels are built: the cache's directory for this key, or, when that is not
    writable (torch's build takes a lock file there, ninja its logs), the same key under the
    system's temporary directory. Returns it and, for the latter, a note saying so."""
    key = _key(cflags)
    home = _cache_root() / "native" / key
    why = _not_writable(home)
    if why is None:
        return home.resolve(), None
    uid = os.getuid() if hasattr(os, "getuid") else 0
    tmp = Path(tempfile.gettempdir()) / f"qvpo-native-{uid}" / key
    if _not_writable(tmp) is not None:
        raise RuntimeError(f"neither the cache {home} ({why}) nor {tmp} is writable")
    return tmp.resolve(), f"the cache {home.parent} is not writable ({why}): built in {tmp}"


def _copy_if_changed(src: Path, dst: Path) -> None:
    """The sources live in the build directory, so its build.ninja names the same paths for every
    checkout or install that shares the cache (no rebuild when another one loads). Written only
    when different (ninja goes by modification times), atomically (another process may build)."""
    data = src.read_bytes()
    if dst.exists() and dst.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)


STALE_LOCK_S = 600  # a build takes seconds; a lock this old was left by a process that was killed


def _clear_stale_lock(where: Path) -> None:
    """torch's builder waits, without end, while the lock file of a build in progress exists; a
    process killed while building leaves it behind. One older than any build is removed."""
    lock = where / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return  # no lock: nobody is building
    if age > STALE_LOCK_S:
        warnings.warn(f"qvpo: removing {lock}, left {age:.0f} s ago by a build that did not finish",
                      RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


def _build_error(e: BaseException) -> str:
    """One line for a failed build: the compiler's first error line, not torch's command echo."""
    lines = str(e).splitlines()
    errors = [ln.strip() for ln in lines[1:] if re.search(r"\berror\b", ln, re.IGNORECASE)]
    return (lines[0].split(":")[0] + ": " + errors[0]) if errors else one_line(e)


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` package (a dependency on x86-64 Linux) puts
    it beside the interpreter, which is not on PATH when a venv's python runs without activation."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and Path(scripts, "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def load() -> Path:
    """Build (or find in the cache) and load the kernels whatever `enabled()` says; returns the
    shared library. Raises if they cannot be built. Once per process: the ops of a second copy
    could not be registered."""
    global _loaded, _note
    if _loaded is not None:
        return _loaded
    from torch.utils import cpp_extension  # here: it imports setuptools, slow, needed only to build

    cflags, ldflags = _flags()
    where, note = build_dir(cflags)
    for src in SOURCES:
        _copy_if_changed(src, where / src.name)
    _clear_stale_lock(where)
    _ninja_on_path()
    try:
        cpp_extension.load(name=NAME, sources=[str(where / "ops.cpp"), str(where / "sampler.c")],
                           extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(where),
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - torch's build error: its first compiler error line
        raise RuntimeError(_build_error(e)) from e
    # the gradient of mish is torch's autograd: forward and backward are both native ops
    torch.library.register_autograd(f"{NAME}::mish", _mish_grad, setup_context=_mish_setup)
    for op in ("mish", "mish_backward"):  # shapes for tracing (torch.compile, meta tensors)
        torch.library.register_fake(f"{NAME}::{op}")(lambda x, *rest: torch.empty_like(x))
    _loaded, _note = where / f"{NAME}.so", note
    if note:
        warnings.warn(f"qvpo: {note}", RuntimeWarning, stacklevel=2)
    return _loaded


def _mish_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _mish_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return mish_backward(x, grad.contiguous())


def library():
    """The kernels' ops (torch.ops.qvpo_native) if they run here, else None: off here
    (`enabled()`), or they failed to build (one warning). Callers then use torch ops."""
    global _lib, _tried, _why
    if _tried:
        return _lib
    _tried = True
    on, _why = enabled()
    if not on:
        return None
    try:
        load()
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use torch ops
        _why = f"the native kernels did not build ({one_line(e)})"
        warnings.warn(f"qvpo: native sampler kernels unavailable ({one_line(e)}); the sampler "
                      "uses torch ops (same maths, slower on CPU)", RuntimeWarning, stacklevel=2)
        return None
    _lib = torch.ops.qvpo_native
    return _lib


def describe(where: bool = True) -> str:
    """One line: the path the sampler takes here by default (native fused, native per-layer or
    torch ops) and why (`where`: and the build directory); loads the kernels if they are on."""
    if library() is None:
        return f"torch ops: {_why or 'the native kernels are off in this process'}"
    if fused_usable(False):
        path = "native fused (the whole sampler in one call; float32" + \
            (", and bf16 on AMX)" if fused_usable(True) else " only, no AMX here for bf16)")
    else:
        path = "native (per-layer kernels; the fused sampler needs AVX-512)"
    return f"{path}: {_why}" + (f"; built in {_loaded.parent}" if where else "") + (f" ({_note})" if _note else "")


class MishFunction:
    """Mish with the native forward and backward under autograd (CPU float32, first-order
    gradients): `apply(x)` is the op qvpo_native::mish, whose gradient `load` registers with
    torch.library (the name is the autograd.Function this used to be)."""

    @staticmethod
    def apply(x: torch.Tensor) -> torch.Tensor:
        return mish(x.contiguous())


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
    """Mish of a contiguous CPU float32 tensor into `out` (may be x), or, if None, into a new
    tensor, differentiable (the op qvpo_native::mish: its gradient is `mish_backward`)."""
    _check(x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu",
           "mish needs a contiguous CPU float32 tensor")
    if out is None:
        if x.requires_grad and torch.is_grad_enabled():
            return _ops.mish(x)
        out = torch.empty_like(x)  # no graph to record: skip the autograd kernel (a few us a call)
    _check(out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
           "mish: bad out")
    _ops.mish_out(x, out)
    return out


def mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * Mish'(x) for contiguous CPU float32 tensors of one shape (a new tensor)."""
    _check(x.is_contiguous() and grad.is_contiguous() and x.shape == grad.shape
           and x.dtype == grad.dtype == torch.float32 and x.device.type == grad.device.type == "cpu",
           "mish_backward needs contiguous CPU float32 x and grad of one shape")
    return _ops.mish_backward(x, grad)


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
    _check(x.is_contiguous() and out.is_contiguous() and out.shape == (N, R, H) and out.data_ptr() != x.data_ptr(),
           "first_layer_mish: bad x or out (out must be a tensor of its own)")
    _check_first_layer("first_layer_mish", R, W_a, state_part, N, A, H)
    _check(step_part.shape == (N, H) and step_part.stride(1) == 1, "first_layer_mish: bad step part")
    for t in (x, W_a, state_part, step_part):
        _check(t.dtype == torch.float32 and t.device.type == "cpu", "first_layer_mish: CPU float32 inputs only")
    _check(out.dtype in _OUT_DTYPES and out.device.type == "cpu", "first_layer_mish: out must be CPU float32 or bfloat16")
    _ops.first_layer_mish(x, W_a, state_part, step_part, out)
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
    _ops.bias_mish(x, bias, out)
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
    _ops.bias_mish_out(x, bias, W_out_t, b_out, out)
    return out


_fused: dict[bool, bool] = {}


def fused_usable(bf16: bool) -> bool:
    """Whether `sample_fused` runs here in this precision: float32 on CPUs with AVX-512, bfloat16
    on CPUs with AMX-BF16 whose OS lets this process use AMX tiles (Linux grants them per
    process on request)."""
    if bf16 not in _fused:
        _fused[bf16] = library() is not None and bool(_ops.fused_available(bf16))
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
    H = W_a.shape[-1]
    _check(T >= 1, f"sample_fused: needs rows, steps and seeds, got {tuple(noise.shape)}")
    _check(W_a.shape[:2] == (N, A), f"sample_fused: bad {tuple(W_a.shape)}")
    Wp, bias, W_out_t, b_out = _fused_network("sample_fused", R, W_a, state_part, hidden, W_out_t, b_out,
                                              [noise, step_part, coefs], bf16)
    _check(W_out_t.shape[1] == A and step_part.shape == (N, T, H) and coefs.shape == (T, 5),
           "sample_fused: bad step part, output layer or coefficients")
    noise, step_part, coefs = noise.contiguous(), step_part.contiguous(), coefs.contiguous()
    return _ops.sample_fused(noise, state_part, step_part, W_a, Wp, bias, W_out_t, b_out, coefs,
                             bool(clip_x0), bool(bf16))


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
    H = W_a.shape[-1]
    _check(W_a.shape[:2] == (N, A), f"mlp_fused: bad {tuple(W_a.shape)}")
    Wp, bias, W_out_t, b_out = _fused_network("mlp_fused", R, W_a, state_part, hidden, W_out_t, b_out,
                                              [x, b1], bf16)
    _check(b1.shape[0] == N and b1.shape[-1] == H and b1.numel() == N * H and b1.stride(-1) == 1,
           f"mlp_fused: bad first-layer bias {tuple(b1.shape)}")
    return _ops.mlp_fused(x.contiguous(), state_part, b1, W_a, Wp, bias, W_out_t, b_out, bool(bf16))
