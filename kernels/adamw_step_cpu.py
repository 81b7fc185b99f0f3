"""The fused AdamW step on quantized moments for the CPU: hand-written C loops.

``kernels/adamw_step_cpu.c`` does one pass per block: decode, update m, v and the parameter in
float32, take the new absmax, requantize, with the block's working set in L1. Same contract and
oracle as the Triton kernel (:mod:`lowprec.kernels.adamw_step`): each entry point equals its
``lowprec.optim.functional`` reference bit for bit (tests):

* :func:`adamw_tensors_cpu_` / :func:`adamw_blocks_cpu_`: block-quantized m and v
  (``adamw_blocks_``), for a whole param group in one call or one tensor;
* :func:`adamw_fp32_tensors_cpu_`: float32 states (``adamw_fp32_``);
* :func:`adamw_rank1_cpu_`: rank-1 normalised v, two passes (``adamw_rank1_``);
* :func:`all_finite` and :func:`increment_`: the optimizer's finite-gradient check and step
  counters, one call per group.

Formats are duck-typed ``lowprec.optim`` StateFormats (no upward import). Work is split into
contiguous ranges run on ``torch.get_num_threads()`` Python threads (ctypes releases the GIL).
:func:`available` says whether the library could be built here; callers fall back to their
PyTorch path when it is not.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from lowprec.kernels import cpu_library
from lowprec.kernels.adamw_step import _fp8_params

LIBRARY = "adamw_step_cpu"

# lp_format.kind in the C source.
KIND_CODEBOOK16, KIND_LINEAR16, KIND_CODEBOOK256, KIND_FP8 = range(4)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_BLOCK = 256
# Hyperparameters the C kernels read per tensor (HP_* in the C source; lowprec.optim.functional.HP_SIZE).
HP_SIZE = 8
# Below this many elements a step runs on one thread (a thread hand-off costs ~10-50 us).
PARALLEL_MIN_ELEMENTS = 1 << 16


class _Format(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32), ("packed", ctypes.c_int32),
        ("table", ctypes.c_void_p), ("mids", ctypes.c_void_p), ("bucket_start", ctypes.c_void_p),
        ("bucket_shift", ctypes.c_int32), ("fp8_mbits", ctypes.c_int32), ("fp8_bias", ctypes.c_int32),
        ("fp8_max", ctypes.c_float), ("fp8_minnorm", ctypes.c_float), ("fp8_subscale", ctypes.c_float),
        ("fp8_inv_max", ctypes.c_float), ("fp8_special_mask", ctypes.c_int32), ("fp8_special_value", ctypes.c_int32),
    ]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C functions' signatures on a loaded library (also used by tests that build
    the portable variant)."""
    lib.lowprec_adamw_tensors.restype = ctypes.c_int
    lib.lowprec_adamw_tensors.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int32, ctypes.POINTER(_Format), ctypes.POINTER(_Format), ctypes.c_int32,
    ]
    lib.lowprec_adamw_fp32_tensors.restype = ctypes.c_int
    lib.lowprec_adamw_fp32_tensors.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
    ]
    lib.lowprec_adamw_rank1_pass1.restype = ctypes.c_int
    lib.lowprec_adamw_rank1_pass1.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
        ctypes.POINTER(_Format), ctypes.POINTER(_Format), ctypes.c_int32,
    ]
    lib.lowprec_adamw_rank1_pass2.restype = ctypes.c_int
    lib.lowprec_adamw_rank1_pass2.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int32, ctypes.POINTER(_Format),
    ]
    lib.lowprec_all_finite.restype = ctypes.c_int32
    lib.lowprec_all_finite.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64]
    lib.lowprec_increment.restype = None
    lib.lowprec_increment.argtypes = [ctypes.c_int32, ctypes.c_void_p]
    lib.lowprec_encode.restype = None
    lib.lowprec_encode.argtypes = [ctypes.POINTER(_Format), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.lowprec_has_f16.restype = ctypes.c_int32
    lib.lowprec_has_f16.argtypes = []
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_library.load(LIBRARY)
    return None if lib is None else bind(lib)


def available() -> bool:
    """True when the C library is built (or buildable) here and C kernels are not turned off."""
    return bool(supported_dtypes())


@functools.cache
def _library_dtypes() -> frozenset[torch.dtype]:
    lib = _library()
    if lib is None:
        return frozenset()
    return frozenset(d for d in DTYPES if d != torch.float16 or lib.lowprec_has_f16())


def supported_dtypes() -> frozenset[torch.dtype]:
    """Parameter dtypes the C kernels step here (empty when they are off or cannot be built)."""
    return _library_dtypes() if cpu_library.enabled() else frozenset()


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether C kernels are on and built here and step parameters of ``dtype``."""
    return dtype in supported_dtypes()


def supports_formats(m_fmt: Any, v_fmt: Any) -> bool:
    """Whether the block kernel handles this pair of state formats (one block size, at most 256,
    a multiple of 32)."""
    bs = m_fmt.block_size
    return bs == v_fmt.block_size and bs <= MAX_BLOCK and bs % 32 == 0


def supports(p: torch.Tensor, m_fmt: Any, v_fmt: Any) -> bool:
    """Whether this kernel handles a step of ``p`` under these (block-quantized) state formats."""
    return p.device.type == "cpu" and supports_dtype(p.dtype) and supports_formats(m_fmt, v_fmt)


def _f32_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def bucket_table(mids: np.ndarray, shift: int) -> np.ndarray | None:
    """For a 256-code map: ``start[k]`` = number of midpoints below every float32 whose bits
    ``>> shift`` equal ``k``, or ``None`` when some bucket holds two midpoints (then one compare
    after the lookup would not decide the code). NaN-only buckets start at 0."""
    keys = np.arange(1 << (32 - shift), dtype=np.uint64)
    first = (keys << shift).astype(np.uint32)
    last = first | np.uint32((1 << shift) - 1)
    negative = (keys >> (31 - shift)) & 1 == 1
    lo = np.where(negative, _f32_bits_to_float(last), _f32_bits_to_float(first))
    hi = np.where(negative, _f32_bits_to_float(first), _f32_bits_to_float(last))
    all_nan = np.isnan(lo) & np.isnan(hi)
    signed_inf = np.where(negative, -np.inf, np.inf).astype(np.float32)
    lo = np.where(np.isnan(lo), signed_inf, lo)  # a bucket shared by an infinity and NaNs
    hi = np.where(np.isnan(hi), signed_inf, hi)
    start = np.searchsorted(mids, lo, side="left")  # #{mids < lo}
    end = np.searchsorted(mids, hi, side="left")
    if np.any((end - start)[~all_nan] > 1):
        return None
    return np.where(all_nan, 0, start).astype(np.uint8)


def fp8_special_codes(table: np.ndarray, mbits: int, bias: int, inv_max: float) -> tuple[int, int]:
    """``(mask, value)`` such that the FP8 codes ``c`` with ``c & mask == value`` are exactly those
    whose table entry the C kernel's arithmetic decode would not reproduce (Inf/NaN); ``(0, 0)``
    (always use the table) when no such rule fits."""
    c = np.arange(256, dtype=np.uint32)
    e, m, sign = (c >> mbits) & ((1 << (7 - mbits)) - 1), c & ((1 << mbits) - 1), (c >> 7) << 31
    with np.errstate(over="ignore", invalid="ignore"):
        normal = (sign | ((e + 127 - bias) << 23) | (m << (23 - mbits))).view(np.float32)
        sub = ((m.astype(np.float32) * np.float32(2.0 ** (1 - bias - mbits))).view(np.uint32) | sign).view(np.float32)
        arith = np.where(e > 0, normal, sub) * np.float32(inv_max)
    differs = arith.view(np.uint32) != table.astype(np.float32).view(np.uint32)
    for mask in (0x7F, 0x7C, 0x78):
        if np.array_equal(differs, (c & mask) == mask):
            return mask, mask
    return 0, 0


class _FormatArgs:
    """The C descriptor of one state format, with the arrays it points to kept alive."""

    def __init__(self, sf: Any) -> None:
        table = np.ascontiguousarray(np.array(sf.table_values, dtype=np.float32))
        self.arrays = [table]
        d = _Format(packed=int(bool(sf.packed)), table=table.ctypes.data)
        if sf.is_fp8:
            fp = _fp8_params(sf.fmt)
            d.kind, d.fp8_mbits, d.fp8_bias = KIND_FP8, fp["MBITS"], fp["BIAS"]
            d.fp8_max, d.fp8_minnorm, d.fp8_subscale = fp["FMAX"], fp["MINNORM"], fp["SUBSCALE"]
            d.fp8_inv_max = float(np.float32(1.0 / sf.fmt.max))
            d.fp8_special_mask, d.fp8_special_value = fp8_special_codes(table, fp["MBITS"], fp["BIAS"],
                                                                        d.fp8_inv_max)
        else:
            mids = np.array(sf.midpoint_values, dtype=np.float32)
            ncodes = len(sf.table_values)
            padded = np.full(ncodes, np.inf, dtype=np.float32)
            padded[: mids.size] = mids
            self.arrays.append(padded)
            d.mids = padded.ctypes.data
            if ncodes == 16:
                linear = sf.table_values == tuple((i + 1) / 16 for i in range(16))
                d.kind = KIND_LINEAR16 if linear else KIND_CODEBOOK16
            elif ncodes == 256:
                d.kind = KIND_CODEBOOK256
                for shift in range(16, 8, -1):  # 64 KiB table first, larger only if needed
                    start = bucket_table(mids, shift)
                    if start is not None:
                        break
                else:
                    raise ValueError(f"adamw_step_cpu: state format {sf.name}: midpoints too dense for a bucket table")
                start = np.concatenate([start, np.zeros(3, dtype=np.uint8)])  # tail for the C kernel's 4-byte gather
                self.arrays.append(start)
                d.bucket_start, d.bucket_shift = start.ctypes.data, shift
            else:
                raise ValueError(f"adamw_step_cpu: state format {sf.name} has {ncodes} codes; expected 16 or 256")
        self.desc = d
        self.ref = ctypes.byref(d)


@functools.cache
def _format_args(sf: Any) -> _FormatArgs:
    return _FormatArgs(sf)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowprec-adamw")


def encode(x: torch.Tensor, sf: Any) -> torch.Tensor:
    """int32 codes (unpacked) of normalised float32 values under ``sf``: the C encoder, exposed so
    tests can hold it against the reference encoder on any values."""
    lib = _library()
    if lib is None:
        raise RuntimeError("adamw_step_cpu: the C library is not available")
    xs = x.detach().float().contiguous().reshape(-1)
    out = torch.empty(xs.shape, dtype=torch.int32)
    lib.lowprec_encode(_format_args(sf).ref, xs.data_ptr(), out.data_ptr(), xs.numel())
    return out.view(x.shape)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> None:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"adamw_step_cpu: {name} must be a contiguous CPU tensor")
    if shape is not None and (tuple(t.shape) != shape or t.dtype != dtype):
        raise ValueError(f"adamw_step_cpu: {name} must be {dtype} of shape {shape}; got {t.dtype} {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# Bounds checks that always run: the C loops trust every pointer to hold the elements the sizes
# imply, so a short or mistyped tensor (a tampered state dict, a hand-edited optimizer state)
# would be read and written out of bounds. O(1) per tensor: dtype, size, device, contiguity.
# ----------------------------------------------------------------------------------------------


def _bytes_per_block(fmt: Any) -> int:
    """Bytes of codes per block: two 4-bit codes per byte when packed."""
    return fmt.block_size // 2 if fmt.packed else fmt.block_size


def _fits(t: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    """Whether the C kernel may access ``numel`` elements of ``dtype`` from ``t.data_ptr()``: a
    contiguous CPU tensor of exactly that dtype and size. (No isinstance test: ~100 ns a tensor
    on the step's path; a non-tensor raises AttributeError, which the callers turn into
    :func:`_refuse`'s message.)"""
    return t.dtype == dtype and t.numel() == numel and t.is_cpu and t.is_contiguous()


def _param_fits(p: torch.Tensor, dtypes: frozenset[torch.dtype], multiple: int) -> bool:
    """Whether ``p`` is a contiguous CPU tensor of a dtype in ``dtypes`` whose size is a multiple of ``multiple``."""
    return p.dtype in dtypes and p.numel() % multiple == 0 and p.is_cpu and p.is_contiguous()


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else ", not contiguous")


def _refuse(i: int, p: Any, dtypes: frozenset[torch.dtype], multiple: int,
            states: list[tuple[str, Any, torch.dtype | None, int]]) -> None:
    """Raise ``ValueError`` naming the first of tensor ``i``'s parameter and ``(name, tensor,
    dtype, numel)`` states that does not fit (the slow path of the checks below)."""
    if not (isinstance(p, torch.Tensor) and _param_fits(p, dtypes, multiple)):
        raise ValueError(f"adamw_step_cpu: tensor {i}: p must be a contiguous CPU tensor of dtype "
                         f"{' or '.join(sorted(map(str, dtypes)))} with a multiple of {multiple} elements; "
                         f"got {_describe(p)}")
    for name, t, dtype, numel in states:
        if not (isinstance(t, torch.Tensor) and _fits(t, dtype, numel)):
            raise ValueError(f"adamw_step_cpu: tensor {i}: {name} must be a contiguous CPU {dtype} tensor of {numel} "
                             f"elements (for p of {p.numel()}); got {_describe(t)}")
    raise ValueError(f"adamw_step_cpu: tensor {i}: arguments the C kernel cannot take")  # the fast check raised


def _check_block_tensors(params: list, grads: list, m_codes: list, m_absmax: list, v_codes: list, v_absmax: list,
                         m_fmt: Any, v_fmt: Any) -> list[int]:
    """The always-on bounds check of :func:`adamw_tensors_cpu_`; returns each tensor's block count."""
    if not supports_formats(m_fmt, v_fmt):
        raise ValueError(f"adamw_step_cpu: unsupported state formats (block sizes {m_fmt.block_size}/"
                         f"{v_fmt.block_size}; one size, a multiple of 32, at most {MAX_BLOCK})")
    dtypes = supported_dtypes()
    bs = m_fmt.block_size
    m_bytes, v_bytes = _bytes_per_block(m_fmt), _bytes_per_block(v_fmt)
    u8, f32 = torch.uint8, torch.float32
    nblocks = []
    for i, (p, g, mc, ma, vc, va) in enumerate(zip(params, grads, m_codes, m_absmax, v_codes, v_absmax)):
        try:
            nb = p.numel() // bs
            ok = (_param_fits(p, dtypes, bs) and _fits(g, p.dtype, nb * bs) and _fits(mc, u8, nb * m_bytes)
                  and _fits(ma, f32, nb) and _fits(vc, u8, nb * v_bytes) and _fits(va, f32, nb))
        except (AttributeError, TypeError):  # not a tensor
            ok = False
        if not ok:
            nb = p.numel() // bs if isinstance(p, torch.Tensor) else 0
            _refuse(i, p, dtypes, bs, [("g", g, getattr(p, "dtype", None), nb * bs), ("m_codes", mc, u8, nb * m_bytes),
                                       ("m_absmax", ma, f32, nb), ("v_codes", vc, u8, nb * v_bytes),
                                       ("v_absmax", va, f32, nb)])
        nblocks.append(nb)
    return nblocks


def _check_fp32_tensors(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list) -> list[int]:
    """The always-on bounds check of :func:`adamw_fp32_tensors_cpu_`; returns each tensor's size."""
    dtypes = supported_dtypes()
    f32 = torch.float32
    numel = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        try:
            n = p.numel()
            ok = _param_fits(p, dtypes, 1) and _fits(g, p.dtype, n) and _fits(m, f32, n) and _fits(v, f32, n)
        except (AttributeError, TypeError):  # not a tensor
            ok = False
        if not ok:
            n = p.numel() if isinstance(p, torch.Tensor) else 0
            _refuse(i, p, dtypes, 1, [("g", g, getattr(p, "dtype", None), n), ("exp_avg", m, f32, n),
                                      ("exp_avg_sq", v, f32, n)])
        numel.append(n)
    return numel


def adamw_tensors_cpu_(params: list[torch.Tensor], grads: list[torch.Tensor], m_codes: list[torch.Tensor],
                       m_absmax: list[torch.Tensor], v_codes: list[torch.Tensor], v_absmax: list[torch.Tensor],
                       hps: list[torch.Tensor], m_fmt: Any, v_fmt: Any, maximize: bool = False,
                       threads: int | None = None, check: bool = True) -> None:
    """:func:`adamw_blocks_cpu_` on several tensors in one C call, each with its own states and
    hyperparameter vector (a param group). ``params[i]``/``grads[i]`` are ``(n_blocks_i, B)``
    views (with ``check=False``, any contiguous tensors of ``n_blocks_i * B`` elements). The
    blocks of all tensors are split evenly over ``threads`` (default ``torch.get_num_threads()``).

    Every call checks, per tensor, what keeps the C loop in bounds (``ValueError`` naming the
    tensor): contiguous CPU tensors, ``p`` of a supported dtype and a whole number of blocks,
    ``g`` of ``p``'s dtype and size, codes uint8 of ``n_blocks * bytes_per_block`` elements,
    absmax float32 of ``n_blocks``, hyperparameter vectors of :data:`HP_SIZE`. ``check=True``
    also requires the documented 2-D shapes; ``check=False`` (the optimizer) skips only that."""
    lib = _library()
    if lib is None:
        raise RuntimeError("adamw_step_cpu: the C library is not available")
    count = len(params)
    if not count == len(grads) == len(m_codes) == len(m_absmax) == len(v_codes) == len(v_absmax) == len(hps):
        raise ValueError("adamw_step_cpu: params, grads, states and hyperparameters must have one entry per tensor")
    bs = m_fmt.block_size
    m_bytes, v_bytes = _bytes_per_block(m_fmt), _bytes_per_block(v_fmt)
    for i, (p, g) in enumerate(zip(params, grads) if check else ()):
        if not supports(p, m_fmt, v_fmt):
            raise ValueError(f"adamw_step_cpu: unsupported step for tensor {i} (dtype {p.dtype}, device {p.device}, "
                             f"block sizes {m_fmt.block_size}/{v_fmt.block_size})")
        if p.dim() != 2 or p.shape[1] != bs or g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"adamw_step_cpu: expected p and g of one dtype and shape (n_blocks, {bs}); got "
                             f"{p.dtype} {tuple(p.shape)}, {g.dtype} {tuple(g.shape)}")
        nb = p.shape[0]
        _check("p", p)
        _check("g", g)
        _check("m_codes", m_codes[i], (nb, m_bytes), torch.uint8)
        _check("v_codes", v_codes[i], (nb, v_bytes), torch.uint8)
        _check("m_absmax", m_absmax[i], (nb,), torch.float32)
        _check("v_absmax", v_absmax[i], (nb,), torch.float32)
    nblocks = _check_block_tensors(params, grads, m_codes, m_absmax, v_codes, v_absmax, m_fmt, v_fmt)
    total = sum(nblocks)
    if total == 0:
        return
    hps = _as_float32_cpu(hps)
    args = (count, _pointers(params), _pointers(grads), (ctypes.c_int32 * count)(*[DTYPES[p.dtype] for p in params]),
            _pointers(m_codes), _pointers(m_absmax), _pointers(v_codes), _pointers(v_absmax), _pointers(hps),
            (ctypes.c_int64 * count)(*nblocks))
    mf, vf = _format_args(m_fmt), _format_args(v_fmt)
    tail = (bs, mf.ref, vf.ref, int(bool(maximize)))
    _run_split(lib.lowprec_adamw_tensors, args, total, tail, total * bs, threads)


def _split(fn: Any, head: tuple, total: int, tail: tuple, elements: int, threads: int | None) -> list[int]:
    """``[fn(*head, start, end, *tail), ...]`` over ``[0, total)`` split evenly over the threads
    (one range when ``elements`` is small: a thread hand-off costs more than it saves)."""
    workers = max(1, threads if threads is not None else torch.get_num_threads())
    workers = min(workers, max(1, elements // PARALLEL_MIN_ELEMENTS))
    if workers == 1:
        return [fn(*head, 0, total, *tail)]
    edges = [total * i // workers for i in range(workers + 1)]
    return [f.result() for f in [_pool(workers).submit(fn, *head, a, b, *tail) for a, b in zip(edges[:-1], edges[1:])]]


def _run_split(fn: Any, head: tuple, total: int, tail: tuple, elements: int, threads: int | None) -> None:
    """:func:`_split` for the step functions, which return 0, or -1 on arguments they reject."""
    if any(_split(fn, head, total, tail, elements, threads)):  # the Python checks ran first: -1 means
        raise RuntimeError(f"adamw_step_cpu: the C kernel rejected the call ({fn.__name__})")  # they disagree


def all_finite(tensors: list[torch.Tensor], threads: int | None = None) -> bool | None:
    """True when every element of every tensor is finite, False when one is Inf or NaN; ``None``
    when the C kernel cannot tell (off, or a tensor that is not a contiguous CPU tensor of a
    supported dtype): the caller then checks another way. One C call for the whole list."""
    dtypes = supported_dtypes()
    if not tensors or not all(t.dtype in dtypes and t.is_cpu and t.is_contiguous() for t in tensors):
        return None
    lib = _library()
    numel = [t.numel() for t in tensors]
    total = sum(numel)
    count = len(tensors)
    head = (count, _pointers(tensors), (ctypes.c_int32 * count)(*[DTYPES[t.dtype] for t in tensors]),
            (ctypes.c_int64 * count)(*numel))
    return all(bool(r) for r in _split(lib.lowprec_all_finite, head, total, (), total, threads))


def increment_(counters: list[torch.Tensor]) -> None:
    """Add 1 to float32 scalar CPU tensors in place (one C call: the optimizer's step counters)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("adamw_step_cpu: the C library is not available")
    for t in counters:
        if t.dtype != torch.float32 or t.numel() != 1 or t.device.type != "cpu":
            raise ValueError(f"adamw_step_cpu: a step counter must be one float32 CPU element; got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    lib.lowprec_increment(len(counters), _pointers(counters))


def _as_float32_cpu(hps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hyperparameter vectors as contiguous float32 CPU tensors (each distinct one converted once),
    each of :data:`HP_SIZE` elements (the C kernels read that many)."""
    done: dict[int, torch.Tensor] = {}
    for h in hps:
        if id(h) not in done:
            h32 = h.detach().to(device="cpu", dtype=torch.float32).contiguous()
            if h32.numel() != HP_SIZE:
                raise ValueError(f"adamw_step_cpu: a hyperparameter vector must have {HP_SIZE} elements; got "
                                 f"shape {tuple(h.shape)}")
            done[id(h)] = h32
    return [done[id(h)] for h in hps]


def _pointers(ts: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def adamw_fp32_tensors_cpu_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                            exp_avg_sqs: list[torch.Tensor], hps: list[torch.Tensor], maximize: bool = False,
                            threads: int | None = None, check: bool = True) -> None:
    """The step on float32 states (``lowprec.optim.functional.adamw_fp32_``) for several tensors in
    one C call: parameters and gradients of one dtype each, float32 moments of the same shape,
    all contiguous CPU tensors; updated in place. Every call checks the dtypes, sizes, device and
    contiguity the C loop relies on; ``check=True`` also requires the moments' and gradient's
    shapes to be the parameter's (``check=False``: the optimizer, equal sizes suffice)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("adamw_step_cpu: the C library is not available")
    count = len(params)
    if not count == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(hps):
        raise ValueError("adamw_step_cpu: params, grads, states and hyperparameters must have one entry per tensor")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs) if check else ()):
        if not supports_dtype(p.dtype) or g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"adamw_step_cpu: tensor {i}: expected p and g of one shape and a supported float "
                             f"dtype; got {p.dtype} {tuple(p.shape)}, {g.dtype} {tuple(g.shape)}")
        _check("p", p)
        _check("g", g)
        _check("exp_avg", m, tuple(p.shape), torch.float32)
        _check("exp_avg_sq", v, tuple(p.shape), torch.float32)
    numel = _check_fp32_tensors(params, grads, exp_avgs, exp_avg_sqs)
    total = sum(numel)
    if total == 0:
        return
    hps = _as_float32_cpu(hps)
    head = (count, _pointers(params), _pointers(grads), (ctypes.c_int32 * count)(*[DTYPES[p.dtype] for p in params]),
            _pointers(exp_avgs), _pointers(exp_avg_sqs), _pointers(hps), (ctypes.c_int64 * count)(*numel))
    _run_split(lib.lowprec_adamw_fp32_tensors, head, total, (int(bool(maximize)),), total, threads)


def adamw_rank1_cpu_(p: torch.Tensor, g: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                     v_codes: torch.Tensor, v_row: torch.Tensor, v_col: torch.Tensor, hp: torch.Tensor, m_fmt: Any,
                     v_fmt: Any, maximize: bool = False, threads: int | None = None) -> None:
    """``lowprec.optim.functional.adamw_rank1_`` in C, in place: block-quantized m and rank-1
    normalised v, ``p`` viewed as (first dim, rest). Two passes over the blocks (the new row and
    column maxima of v are needed before any v code is written); each pass is split over
    ``threads``, pass 1 folding into per-thread maxima that are then reduced."""
    lib = _library()
    if lib is None:
        raise RuntimeError("adamw_step_cpu: the C library is not available")
    if not supports(p, m_fmt, v_fmt) or p.dim() < 2:
        raise ValueError(f"adamw_step_cpu: unsupported rank-1 step (dtype {p.dtype}, device {p.device}, "
                         f"shape {tuple(p.shape)}, block sizes {m_fmt.block_size}/{v_fmt.block_size})")
    if g.shape != p.shape or g.dtype != p.dtype:
        raise ValueError(f"adamw_step_cpu: g must match p; got {g.dtype} {tuple(g.shape)} for {p.dtype} {tuple(p.shape)}")
    bs = m_fmt.block_size
    n = p.numel()
    rows, cols = int(p.shape[0]), n // max(int(p.shape[0]), 1)
    nb = -(-n // bs)
    _check("p", p)
    _check("g", g)
    _check("m_codes", m_codes, (nb, _bytes_per_block(m_fmt)), torch.uint8)
    _check("v_codes", v_codes, (nb, _bytes_per_block(v_fmt)), torch.uint8)
    _check("m_absmax", m_absmax, (nb,), torch.float32)
    _check("v_row", v_row, (rows,), torch.float32)
    _check("v_col", v_col, (cols,), torch.float32)
    if n == 0:
        return
    hp32 = _as_float32_cpu([hp])[0]
    mf, vf = _format_args(m_fmt), _format_args(v_fmt)
    workers = max(1, threads if threads is not None else torch.get_num_threads())
    workers = min(workers, max(1, n // PARALLEL_MIN_ELEMENTS))
    row_part = torch.zeros(workers, rows, dtype=torch.int32)  # float32 bits of the maxima (see the C source)
    col_part = torch.zeros(workers, cols, dtype=torch.int32)
    edges = [nb * i // workers for i in range(workers + 1)]
    dtype = DTYPES[p.dtype]

    def pass1(w: int) -> int:
        return lib.lowprec_adamw_rank1_pass1(
            p.data_ptr(), g.data_ptr(), dtype, m_codes.data_ptr(), m_absmax.data_ptr(), v_codes.data_ptr(),
            v_row.data_ptr(), v_col.data_ptr(), row_part[w].data_ptr(), col_part[w].data_ptr(), hp32.data_ptr(),
            edges[w], edges[w + 1], n, cols, bs, mf.ref, vf.ref, int(bool(maximize)))

    def run(fn: Any) -> None:
        results = [fn(0)] if workers == 1 else [f.result() for f in [_pool(workers).submit(fn, w)
                                                                      for w in range(workers)]]
        if any(results):
            raise RuntimeError("adamw_step_cpu: the C kernel rejected the rank-1 step")

    run(pass1)
    tiny = torch.finfo(torch.float32).tiny
    row_new = row_part.view(torch.float32).amax(0)
    col_new = col_part.view(torch.float32).amax(0)
    row_new = torch.where(row_new >= tiny, row_new, torch.zeros_like(row_new))  # flush_tiny
    col_new = torch.where(col_new >= tiny, col_new, torch.zeros_like(col_new))

    def pass2(w: int) -> int:
        return lib.lowprec_adamw_rank1_pass2(
            g.data_ptr(), dtype, v_codes.data_ptr(), v_row.data_ptr(), v_col.data_ptr(), row_new.data_ptr(),
            col_new.data_ptr(), hp32.data_ptr(), edges[w], edges[w + 1], n, cols, bs, vf.ref)

    run(pass2)
    v_row.copy_(row_new)
    v_col.copy_(col_new)


def adamw_blocks_cpu_(p: torch.Tensor, g: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                      v_codes: torch.Tensor, v_absmax: torch.Tensor, hp: torch.Tensor, m_fmt: Any, v_fmt: Any,
                      maximize: bool = False, threads: int | None = None) -> None:
    """One fused step on ``(n_blocks, B)`` contiguous CPU views, in place; arguments as
    ``lowprec.optim.functional.adamw_blocks_``. ``threads``: default ``torch.get_num_threads()``."""
    adamw_tensors_cpu_([p], [g], [m_codes], [m_absmax], [v_codes], [v_absmax], [hp], m_fmt, v_fmt, maximize, threads)


__all__ = ["available", "supports", "supports_dtype", "supported_dtypes", "supports_formats", "adamw_blocks_cpu_", "adamw_tensors_cpu_", "adamw_fp32_tensors_cpu_", "all_finite", "adamw_rank1_cpu_", "increment_", "encode", "bucket_table"]
