"""Quantize-dequantize ("fake quantization") of the block-scaled formats (OCP MX, NVFP4) in one
fused pass, for the emulated block-scaled GEMM on the CPU.

The emulated GEMM of :class:`lowprec.matmul.block_scaled.BlockScaledGemm` multiplies the
*dequantized* operands in float32, so packing E2M1 codes two per byte, storing E8M0 / E4M3 scale
bytes and unpacking them again is wasted work, and so is computing stochastic rounding's Philox
bits in a dozen eager int64 passes. :func:`mx_fake_quantize` and :func:`nvfp4_fake_quantize` return
exactly ``q.dequantize(torch.float32)`` of the reference quantizers (:func:`lowprec.formats.mx_quantize`,
:func:`lowprec.formats.nvfp4_quantize`, through the kernels' dispatch functions), bit for bit:
same seed and Philox offsets for stochastic rounding, NaN for a block holding NaN/Inf, zeros for
an all-zero block or a block whose NVFP4 scale underflows, ragged sizes padded and cropped back,
NVFP4's 16 x 16 weight tiles and its fused 16 x 16 RHT (``rht_seed``).

How: the arithmetic is the reference's own (:func:`lowprec.formats._mx_scaled`,
:func:`lowprec.formats._nvfp4_scaled`, :func:`lowprec.formats._round_to_grid`,
:func:`lowprec.formats._philox`), minus the packing, and the dequantization is the product of the
rounded elements with the block's decoded scale that ``dequantize`` computes from the stored
bytes (both are exact encodings, so the product is the same float32 operation on the same
values). On the CPU it runs as one function compiled by Inductor (:func:`lowprec.compiled.run_compiled`,
dynamic shapes, one graph per configuration): the block amax, scale, rounding (Philox included,
as vectorised int64 loops) and dequantization fuse into a few loops over the tensor. Inductor's CPU
code keeps IEEE division (no reciprocal for a constant divisor on the CPU), does not contract
multiply-adds, and keeps NaN and Inf; the tests check every case bit for bit against the
reference. Philox uses the wrapping int64 product (:func:`lowprec.formats._mul32_wrap`, about twice
as fast compiled as the split one); since a wrapping signed product is not something C++ promises,
every compiled graph is checked once against the eager arithmetic on a probe operand before it is
used, and runs eagerly if it disagrees.

Where it runs: ``impl="auto"`` compiles on the CPU for the layouts the kernels take (blocks along
the last dimension, or along dim 0 of a 2-D tensor) when the operand has at least
:data:`COMPILE_MIN_NUMEL` elements (runs the same arithmetic eagerly below that) and uses the reference (``q.dequantize()`` of
the kernels' dispatch: Triton on CUDA) elsewhere, for empty tensors, and when ``LOWPREC_COMPILE=0``.
Inside a graph being compiled it traces the fused arithmetic into that graph.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowprec.compiled import run_compiled
from lowprec.formats import (
    E2M1,
    MX_BLOCK,
    MX_ELEMENTS,
    NVFP4_BLOCK,
    ROUNDINGS,
    FloatFormat,
    _check_input,
    _mul32_wrap,
    _mx_scaled,
    _nvfp4_scaled,
    _philox,
    _pow2,
    _resolve_seed,
    _round_to_grid,
    nvfp4_tensor_scale,
    philox_key,
    sr_bits,
)

IMPLS = ("auto", "compiled", "eager", "reference")
RHT_SIZE = 16  # NVFP4 training's 16 x 16 Hadamard blocks (arXiv 2509.25149), as lowprec.rht.RHT_SIZE
_FNS: dict[str, Callable[..., torch.Tensor]] = {}
_VERIFIED: dict[str, bool] = {}  # key -> the compiled graph reproduced the eager arithmetic on the probe


def _check_args(x: torch.Tensor, rounding: str, impl: str, what: str) -> None:
    _check_input(x, f"{what}: x")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{what}: rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be one of {IMPLS}; got {impl!r}")


def _layout(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, bool] | None:
    """``(x2, transposed)``: x as rows x K with K the blocked dimension, K last (``x.t()`` for dim 0
    of a 2-D tensor: ``transposed``), or None for other layouts (those run the reference)."""
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        return None
    d = dim % x.dim()
    if d == x.dim() - 1:
        return x.reshape(-1, x.shape[-1]), False
    if x.dim() == 2 and d == 0:
        return x.t(), True
    return None


# Below this many elements ``impl="auto"`` runs the same arithmetic eagerly: compiling a
# configuration costs seconds to tens of seconds once per process, which only pays on operands of
# real size (the demo Llama's are 2048 x 256 and larger); tiny ones (tests, toy models) would spend
# far longer compiling than computing.
COMPILE_MIN_NUMEL = 1 << 16


def _compiles(x: torch.Tensor, impl: str) -> bool:
    """Whether the fast path runs compiled (else its eager form): always for ``"compiled"``, for
    ``"auto"`` from :data:`COMPILE_MIN_NUMEL` elements up."""
    return impl == "compiled" or (impl == "auto" and x.numel() >= COMPILE_MIN_NUMEL)


def _use_fast(x: torch.Tensor, impl: str) -> bool:
    if impl == "reference" or x.numel() == 0:
        return False
    if impl == "auto":
        return x.device.type == "cpu" and os.environ.get("LOWPREC_COMPILE", "1") != "0"
    return True


def _own_function(fn: Callable[..., torch.Tensor], key: str) -> Callable[..., torch.Tensor]:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts recompiles
    against its limit, per code object; every configuration here is a closure of one factory, so
    without this they would share one code object and, past the limit, silently run eagerly."""
    name = "block_fake_quant_" + "".join(c if c.isalnum() else "_" for c in key)
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _probe_like(x2: torch.Tensor) -> torch.Tensor:
    """A small operand in x2's layout (row-major, or a transposed view) that exercises every branch:
    magnitudes over 40 binades, a ragged last block (48 % 32), an all-zero block, NaN and Inf
    blocks, negative zeros and subnormals."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(40, 48, generator=g) * torch.logspace(-20, 20, 48)[None, :]
    p[3, 0:16] = 0.0
    p[5, 16:20] = -0.0
    p[7, 33] = float("nan")
    p[9, 2] = float("-inf")
    p[11, 40:48] = 1e-42
    p = p.to(x2.device)
    transposed = x2.dim() == 2 and x2.stride(0) == 1 and x2.stride(1) != 1
    return p.t().contiguous().t() if transposed else p


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (its sign bit is not specified)."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb)) and bool(torch.equal(torch.where(na, 0.0, a).view(torch.int32),
                                                         torch.where(nb, 0.0, b).view(torch.int32)))


def _run(key: str, factory: Callable[[], Callable[..., torch.Tensor]], args: tuple, compiled: bool) -> torch.Tensor:
    fn = _FNS.get(key)
    if fn is None:
        fn = _FNS[key] = _own_function(factory(), key)
    if not compiled or torch.compiler.is_compiling() or _VERIFIED.get(key) is False:
        return fn(*args)

    def call(a: tuple) -> torch.Tensor:
        # Both sizes of the operand are symbolic (one graph for every shape); every other int (block
        # size, format constants) stays a constant of the generated code.
        torch._dynamo.maybe_mark_dynamic(a[0], 0)
        torch._dynamo.maybe_mark_dynamic(a[0], 1)
        return run_compiled(key, fn, *a)

    if key not in _VERIFIED:
        # Once per graph: the compiled code must reproduce the eager arithmetic bit for bit on a
        # probe (Philox's int64 products wrap in the generated C++, as torch's own do); if it does
        # not, this configuration runs eagerly from now on (correct, slower), with one warning.
        probe = (_probe_like(args[0]), *args[1:])
        _VERIFIED[key] = _same_bits(call(probe), fn(*probe))
        if not _VERIFIED[key]:
            warnings.warn(f"lowprec: the compiled {key} did not reproduce the reference bit for bit on a probe; "
                          f"running it eagerly", RuntimeWarning, stacklevel=3)
            return fn(*args)
    return call(args)


def _crop(out: torch.Tensor, x2_shape: torch.Size, transposed: bool, shape: torch.Size) -> torch.Tensor:
    """The padded blocked result cropped to x's shape, as a view where the reference's is one (its
    ``_crop_back``), so the GEMM reads the same memory layout. Cropping happens here, not in the
    compiled graph, where it would cost a strided copy."""
    out = out[: x2_shape[0], : x2_shape[1]]
    return out.t() if transposed else out.reshape(shape)


def _philox_key_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    k0, k1 = philox_key(seed if seed is not None else 0)
    return torch.tensor([k0, k1], dtype=torch.int64, device=device)


def _sr_bits_blocked(key: torch.Tensor, shape: tuple[int, int], x2_shape: tuple[int, int], transposed: bool,
                     device: torch.device) -> torch.Tensor:
    """:func:`lowprec.formats.sr_bits` of the Philox words at each element's flat row-major index in
    the original tensor, for the blocked layout of ``shape`` (x2 of ``x2_shape`` zero-padded; padding,
    whose values are zero and round to zero whatever their bits, reuses other indices)."""
    rows, k = x2_shape
    i = torch.arange(shape[0], dtype=torch.int64, device=device)[:, None]
    j = torch.arange(shape[1], dtype=torch.int64, device=device)[None, :]
    offs = j * rows + i if transposed else i * k + j
    return sr_bits(_philox(offs, key[0], key[1], _mul32_wrap))


# ----------------------------------------------------------------------------------------------
# MX
# ----------------------------------------------------------------------------------------------


def _mx_factory(f: FloatFormat, stochastic: bool, transposed: bool) -> Callable[..., torch.Tensor]:
    B = MX_BLOCK

    def mx_fake(x2: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        rows, k = x2.shape
        nb = (k + B - 1) // B
        xb = F.pad(x2, (0, nb * B - k)).reshape(rows, nb, B)
        e, bad, xs = _mx_scaled(xb, f)
        bits = _sr_bits_blocked(key, (rows, nb * B), (rows, k), transposed, x2.device).reshape(xb.shape) if stochastic else None
        vals = _round_to_grid(xs, f, bits)
        out = torch.where(bad, float("nan"), vals * _pow2(e))  # mx_dequantize's product; NaN scale: NaN
        return out.reshape(rows, nb * B)

    return mx_fake


def mx_fake_quantize(
    x: torch.Tensor,
    elem: str = "e4m3",
    *,
    dim: int = -1,
    rounding: str = "nearest",
    seed: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``mx_quantize(x, elem, dim=dim, rounding=rounding, seed=seed).dequantize(torch.float32)``
    (32-element blocks, OCP MX v1.0), bit for bit, without packing: float32, x's shape.

    ``impl``: ``"auto"`` (compiled on the CPU, the reference elsewhere or with
    ``LOWPREC_COMPILE=0``), ``"compiled"``, ``"eager"`` (the same fused arithmetic run by eager
    torch) or ``"reference"``. Layouts other than blocks along the last dimension or dim 0 of a
    2-D tensor, and empty tensors, always run the reference. ``seed=None`` with stochastic
    rounding draws the seed from torch's global generator, as the reference does.
    """
    from lowprec.kernels.mx_quantize import mx_quantize

    _check_args(x, rounding, impl, "mx_fake_quantize")
    if elem not in MX_ELEMENTS:
        raise ValueError(f"mx_fake_quantize: elem must be one of {tuple(MX_ELEMENTS)}; got {elem!r}")
    lay = _layout(x, dim) if _use_fast(x, impl) else None
    if lay is None:
        return mx_quantize(x, elem, dim=dim, block_size=MX_BLOCK, rounding=rounding, seed=seed
                           ).dequantize(torch.float32)
    x2, transposed = lay
    stochastic = rounding == "stochastic"
    seed_ = _resolve_seed(seed) if stochastic else None
    key = f"block_fake_quant:mx-{elem}-{rounding}-{'t' if transposed else 'n'}"
    out = _run(key, lambda: _mx_factory(MX_ELEMENTS[elem], stochastic, transposed),
               (x2.detach().float(), _philox_key_tensor(seed_, x.device)), _compiles(x, impl))
    return _crop(out, x2.shape, transposed, x.shape)


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------


def _rht16_last(x2: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """:func:`lowprec.kernels.nvfp4_quantize.rht16` along the last dimension of a 2-D ``x2``, operation
    for operation (signs, four butterfly stages, times 1/4), with the signs given as a tensor."""
    g = x2.reshape(-1, RHT_SIZE)
    y = torch.where(signs < 0, -g, g)
    for _ in range(4):
        a, b = y[:, 0::2], y[:, 1::2]
        y = torch.cat([a + b, a - b], dim=1)
    return (y * 0.25).reshape(x2.shape)


def _nvfp4_factory(stochastic: bool, transposed: bool, block_2d: bool, rht: bool,
                   given_amax: bool) -> Callable[..., torch.Tensor]:
    B = NVFP4_BLOCK

    def nvfp4_fake(x2: torch.Tensor, key: torch.Tensor, signs: torch.Tensor, tamax: torch.Tensor) -> torch.Tensor:
        rows, k = x2.shape
        if rht:
            x2 = _rht16_last(x2, signs)
        if not given_amax:  # max |x| over the finite values (of the transformed x with RHT)
            xa = x2.abs()
            tamax = torch.where(torch.isfinite(xa), xa, 0.0).amax()
        S = nvfp4_tensor_scale(tamax)
        nb = (k + B - 1) // B
        nr = (rows + B - 1) // B * B if block_2d else rows  # rows padded to whole tiles
        xt = F.pad(x2, (0, nb * B - k, 0, nr - rows) if block_2d else (0, nb * B - k))
        if block_2d:
            xb = xt.reshape(nr // B, B, nb, B)
            amax_b = xb.abs().amax(dim=(1, 3), keepdim=True)
        else:
            xb = xt.reshape(rows, nb, B)
            amax_b = xb.abs().amax(dim=-1, keepdim=True)
        _, db, bad, xs = _nvfp4_scaled(xb, amax_b, S)
        bits = _sr_bits_blocked(key, (nr, nb * B), (rows, k), transposed, x2.device).reshape(xb.shape) if stochastic else None
        vals = _round_to_grid(xs, E2M1, bits)
        out = torch.where(bad, float("nan"), vals * db)  # nvfp4_dequantize's product; NaN scale: NaN
        return out.reshape(nr, nb * B)

    return nvfp4_fake


def nvfp4_fake_quantize(
    x: torch.Tensor,
    *,
    dim: int = -1,
    block_2d: bool = False,
    tensor_amax: torch.Tensor | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
    rht_seed: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``nvfp4_quantize(x, dim=dim, block_2d=block_2d, tensor_amax=tensor_amax, rounding=rounding,
    seed=seed, rht_seed=rht_seed).dequantize(torch.float32)`` (the kernels' dispatch function:
    ``rht_seed`` quantizes :func:`lowprec.kernels.nvfp4_quantize.rht16` of x along ``dim``), bit for
    bit, without packing: float32, x's shape. ``impl`` as in :func:`mx_fake_quantize`."""
    from lowprec.kernels.nvfp4_quantize import _tensor_amax_arg, nvfp4_quantize

    _check_args(x, rounding, impl, "nvfp4_fake_quantize")
    if rht_seed is not None and (isinstance(rht_seed, bool) or not isinstance(rht_seed, int)):
        raise TypeError(f"nvfp4_fake_quantize: rht_seed must be an int or None; got {type(rht_seed).__name__}")
    lay = _layout(x, dim) if _use_fast(x, impl) else None
    if lay is not None and block_2d and x.dim() != 2:
        lay = None  # the reference raises its error
    if lay is not None and rht_seed is not None and lay[0].shape[1] % RHT_SIZE:
        lay = None  # rht16 raises its error
    if lay is None:
        return nvfp4_quantize(x, dim=dim, block_2d=block_2d, tensor_amax=tensor_amax, rounding=rounding, seed=seed,
                              rht_seed=rht_seed).dequantize(torch.float32)
    from lowprec.rht import random_signs

    x2, transposed = lay
    stochastic = rounding == "stochastic"
    seed_ = _resolve_seed(seed) if stochastic else None
    given = tensor_amax is not None
    tamax = _tensor_amax_arg(tensor_amax, x.device) if given else torch.zeros((), device=x.device)
    rht = rht_seed is not None
    signs = random_signs(rht_seed, RHT_SIZE).to(x.device) if rht else torch.ones(RHT_SIZE, device=x.device)
    key = (f"block_fake_quant:nvfp4-{rounding}-{'t' if transposed else 'n'}{'-2d' if block_2d else ''}"
           f"{'-rht' if rht else ''}{'-amax' if given else ''}")
    out = _run(key, lambda: _nvfp4_factory(stochastic, transposed, block_2d, rht, given),
               (x2.detach().float(), _philox_key_tensor(seed_, x.device), signs, tamax), _compiles(x, impl))
    return _crop(out, x2.shape, transposed, x.shape)


__all__ = ["IMPLS", "mx_fake_quantize", "nvfp4_fake_quantize"]
