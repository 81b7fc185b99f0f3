"""Every kernel launch the launchers in :mod:`lowprec.kernels` can issue, derived by calling them.

Each launcher is called over the whole domain of its public arguments (formats, input dtypes the
dispatch sends to Triton, granularities, flags, block sizes, aligned / ragged / strided shapes)
with small CPU tensors inside :func:`lowprec.kernels.aot_check.capture_launches`: nothing runs,
and what is recorded is exactly what the launcher derives (constexprs, dtypes, divisibility of
sizes, launch options). :func:`~lowprec.kernels.aot_check.unique_launches` then keeps one launch
per specialisation. Nothing here is hand-picked per kernel: a new flag in a launcher shows up as
new launches.

Unbounded arguments are sampled at their codegen boundaries: block sizes at every power of two
the launchers' tables cover plus an odd and a non-power-of-two size; shapes as aligned (sizes
multiples of 16), ragged and (where a launcher takes strides) transposed views.

:data:`STREAMING` names, per kernel, the pointers that carry the bulk traffic and the elements
one program owns, for the vectorisation checks and the static bandwidth estimate.

The optimizer's state formats live above this package (``lowprec.optim``); callers pass them in
(:func:`optimizer_launches`), so the layering ``kernels <- optim`` holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lowprec.kernels.aot_check import Launch, capture_launches, unique_launches
from lowprec.kernels.dispatch import TRITON_DTYPES

# Floating input dtypes the dispatch sends to the Triton kernels (on some target).
INPUT_DTYPES = tuple(d for d in TRITON_DTYPES if d.is_floating_point)
FP8_FORMATS = ("e4m3", "e5m2")
# Code-book block sizes: the library's own (32..256), a big one, the largest a program takes,
# an odd one (host-side packing) and one that is not a power of two.
CODEBOOK_BLOCKS = (32, 64, 128, 256, 1024, 8192, 7, 96)

# kernel -> (pointers whose loads/stores must be vectorised on aligned shapes, elements per
# program as a function of the launch's constexprs). Filled by the kernel modules' owners here.
STREAMING: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[dict[str, Any]], int]]] = {
    "_fp8_amax_kernel": (("x_ptr",), (), lambda c: c["BLOCK"]),
    "_fp8_cast_tensor_kernel": (("x_ptr",), ("out_ptr",), lambda c: c["BLOCK"]),
    "_fp8_cast_rows_kernel": (("x_ptr",), ("out_ptr",), lambda c: c["BLOCK_M"] * c["BLOCK_N"]),
    "_cast_transpose_kernel": (("x_ptr",), ("q_ptr",), lambda c: c["BLOCK_M"] * c["BLOCK_N"]),
    "_codebook_quant_kernel": (("x_ptr",), ("codes_ptr",), lambda c: c["ROWS"] * c["BLOCK_SIZE"]),
    "_codebook_dequant_kernel": (("codes_ptr",), ("out_ptr",), lambda c: c["BLOCK"]),
    "_adamw_blocks_kernel": (("p_ptr", "g_ptr"), ("p_ptr",), lambda c: c["ROWS"] * c["BLOCK_SIZE"]),
    # the block quantizers load x through mx_quantize.load_f32, whose pointer argument is ``ptrs``
    "_mx_quantize_kernel": (("ptrs",), ("data_ptr",), lambda c: c["BLOCK_R"] * c["BLOCK_C"]),
    "_nvfp4_amax_kernel": (("ptrs",), (), lambda c: c["BLOCK_R"] * c["BLOCK_C"]),
    "_nvfp4_quantize_kernel": (("ptrs",), ("data_ptr",), lambda c: c["BLOCK_R"] * c["BLOCK_C"]),
}

# Packed 4-bit codes may move as one 32-bit word per thread (eight codes per instruction, fully
# coalesced across the warp) instead of a .v2/.v4 vector: the tile holds too few code bytes per
# thread for more. Narrower accesses still fail the check.
WORD_OK = {("_codebook_quant_kernel", "codes_ptr"), ("_codebook_dequant_kernel", "codes_ptr"),
           ("_mx_quantize_kernel", "data_ptr"), ("_nvfp4_quantize_kernel", "data_ptr")}


def _x(shape: Sequence[int], dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    x = torch.zeros(shape, dtype=torch.float32)
    if layout == "transposed":
        x = torch.zeros(tuple(reversed(shape)), dtype=torch.float32).t()
    return x.to(dtype)


SHAPES = {"aligned": (64, 256), "ragged": (33, 70)}


def fp8_cast_launches() -> list[Launch]:
    """``scaled_fp8_cast``'s launcher over formats x dtypes x granularity x scale x margin x
    power-of-two x shapes (the per-row BLOCK_N follows the column count: every power of two)."""
    from lowprec.kernels.fp8_cast import MAX_BLOCK_N, _fp8_format, _triton_cast

    out: list[Launch] = []
    cols_for_block_n = [1 << k for k in range(MAX_BLOCK_N.bit_length())] + [MAX_BLOCK_N * 2]
    for fmt, dtype, gran, given, margin, pow2 in itertools.product(
            FP8_FORMATS, INPUT_DTYPES, ("tensor", "row"), (False, True), (0, 1), (False, True)):
        f = _fp8_format(fmt)
        shapes = list(SHAPES.items())
        if gran == "row":
            shapes += [(f"cols={c}", (3, c)) for c in cols_for_block_n]
        for tag, shape in shapes:
            x = _x(shape, dtype)
            s = None
            if given:
                s = torch.ones(()) if gran == "tensor" else torch.ones(shape[0], 1)
            with capture_launches(f"{fmt} {str(dtype)[6:]} {gran} scale={'given' if given else 'amax'} "
                                  f"margin={margin} pow2={pow2} {tag}") as got:
                _triton_cast(x, f, s, gran, margin, pow2)
            out += got
    return unique_launches(out)


def cast_transpose_launches() -> list[Launch]:
    from lowprec.kernels.fp8_cast_transpose import cast_transpose_triton

    out: list[Launch] = []
    for fmt, dtype, transpose, (tag, shape, layout) in itertools.product(
            FP8_FORMATS, INPUT_DTYPES, (True, False),
            [("aligned", (64, 256), "contiguous"), ("ragged", (33, 70), "contiguous"),
             ("transposed", (64, 256), "transposed")]):
        with capture_launches(f"{fmt} {str(dtype)[6:]} transpose={transpose} {tag}") as got:
            cast_transpose_triton(_x(shape, dtype, layout), torch.ones(()), fmt, transpose)
        out += got
    return unique_launches(out)


def amax_scale_launches() -> list[Launch]:
    from lowprec.kernels.fp8_amax_scale import amax_scale_update_triton

    out: list[Launch] = []
    for reduction, margin, (n, h) in itertools.product(("max", "most_recent"), (0, 1), ((3, 1024), (1, 16), (5, 7))):
        hist = torch.zeros(n, h)
        with capture_launches(f"{reduction} margin={margin} n={n} H={h}") as got:
            amax_scale_update_triton(hist, torch.ones(n), torch.ones(n), torch.full((n,), 448.0), 0, margin, reduction)
        out += got
    return unique_launches(out)


def codebook_launches() -> list[Launch]:
    import lowprec.formats as formats
    from lowprec.formats import CodebookFormat, dequantize, get_format  # noqa: F401
    from lowprec.kernels.codebook import _triton_dequantize, _triton_quantize

    fmts = sorted({f.name: f for f in vars(formats).values() if isinstance(f, CodebookFormat)}.values(),
                  key=lambda f: f.name)
    out: list[Launch] = []
    for f, bs, dtype, given, pack, ragged in itertools.product(fmts, CODEBOOK_BLOCKS, INPUT_DTYPES, (False, True),
                                                               (False, True), (False, True)):
        rows = 3 if ragged else 16
        x = _x((rows, bs * 2), dtype)
        s = torch.ones(rows, 2, 1) if given else None
        with capture_launches(f"{f.name} block={bs} {str(dtype)[6:]} scale={'given' if given else 'amax'} "
                              f"pack={pack} {'ragged' if ragged else 'aligned'}") as got:
            _triton_quantize(x, f, bs, s, pack)
        out += got
    for f, (gran, bs), out_dtype, pack, ragged in itertools.product(
            fmts, (("block", 64), ("block", 7), ("row", None), ("tensor", None)),
            (torch.float32, torch.bfloat16, torch.float16), (False, True), (False, True)):
        from lowprec.formats import quantize

        n = 14 * (bs or 8) if ragged else 64 * (bs or 16)
        q = quantize(torch.randn(2, n // 2), f, None, gran, bs, pack and f.bits <= 4)
        with capture_launches(f"dequant {f.name} {gran} block={bs} -> {str(out_dtype)[6:]} packed={q.packed} "
                              f"{'ragged' if ragged else 'aligned'}") as got:
            _triton_dequantize(q, f, out_dtype)
        out += got
    return unique_launches(out)


def optimizer_launches(format_pairs: Iterable[tuple[Any, Any]]) -> list[Launch]:
    """The fused AdamW step over ``(m_format, v_format)`` pairs (``lowprec.optim`` state formats)
    x parameter dtypes x maximize x block counts (a few blocks, many, a ragged count)."""
    from lowprec.kernels.adamw_step import adamw_blocks_triton_

    out: list[Launch] = []
    for (mf, vf), dtype, maximize, nb in itertools.product(format_pairs, (torch.float32, torch.bfloat16, torch.float16),
                                                           (False, True), (3, 64, 4097)):
        bs = mf.block_size
        p = torch.zeros(nb, bs, dtype=dtype)
        mc = torch.zeros(nb * mf.codes_per_block, dtype=torch.uint8)
        vc = torch.zeros(nb * vf.codes_per_block, dtype=torch.uint8)
        hp = torch.ones(8)
        with capture_launches(f"{mf.name}/{vf.name} {str(dtype)[6:]} maximize={maximize} blocks={nb}") as got:
            adamw_blocks_triton_(p, p.clone(), mc, torch.zeros(nb), vc, torch.zeros(nb), hp, mf, vf, maximize)
        out += got
    return unique_launches(out)


# MX / NVFP4 quantize: (rows, K) shapes: aligned (K a multiple of every block), ragged K, and
# blocks along dim 0 of a 2-D tensor (a transposed read). The SR seed and the
# RHT sign mask are runtime ints; the values used here are multiples of 16 (RHT seed 30 gives the
# sign mask 2224) so the aligned launches count as aligned in the vectorisation check.
# float16 loads compile like bfloat16's (a 2-byte vector load, widened in registers), so they are
# left out to keep the compile test short.
BLOCK_SHAPES = (("aligned", (64, 256), -1), ("ragged", (33, 70), -1), ("transposed", (256, 64), 0))
BLOCK_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def mx_launches() -> list[Launch]:
    """``mx_quantize_triton`` over element formats x roundings x input dtypes x block sizes x shapes."""
    from lowprec.kernels.mx_quantize import mx_quantize_triton

    out: list[Launch] = []
    for elem, rounding, dtype, bs, (tag, shape, dim) in itertools.product(
            ("e4m3", "e5m2", "e2m1"), ("nearest", "stochastic"), BLOCK_INPUT_DTYPES, (32, 16),
            BLOCK_SHAPES):
        with capture_launches(f"{elem} {rounding} {str(dtype)[6:]} block={bs} {tag}") as got:
            mx_quantize_triton(_x(shape, dtype), elem, dim=dim, block_size=bs, rounding=rounding, seed=16)
        out += got
    return unique_launches(out)


def nvfp4_launches() -> list[Launch]:
    """``nvfp4_quantize_triton`` over roundings x RHT x given/derived tensor amax x dtypes x shapes."""
    from lowprec.kernels.nvfp4_quantize import nvfp4_quantize_triton

    out: list[Launch] = []
    for rounding, rht_seed, given, dtype, (tag, shape, dim) in itertools.product(
            ("nearest", "stochastic"), (None, 30), (False, True), BLOCK_INPUT_DTYPES, BLOCK_SHAPES):
        if rht_seed is not None and shape[dim] % 16:
            continue
        with capture_launches(f"{rounding} rht={rht_seed is not None} amax={'given' if given else 'kernel'} "
                              f"{str(dtype)[6:]} {tag}") as got:
            nvfp4_quantize_triton(_x(shape, dtype), dim=dim, tensor_amax=torch.ones(()) if given else None,
                                  rounding=rounding, seed=16, rht_seed=rht_seed)
        out += got
    return unique_launches(out)


def all_launches(optimizer_format_pairs: Iterable[tuple[Any, Any]] = ()) -> list[Launch]:
    """Every launch of every launcher in the package (see the module docstring)."""
    return (fp8_cast_launches() + cast_transpose_launches() + amax_scale_launches() + codebook_launches()
            + optimizer_launches(optimizer_format_pairs) + mx_launches() + nvfp4_launches())


def covering_subset(launches: Sequence[Launch]) -> list[Launch]:
    """A subset in which every kernel meets every value of each of its arguments' specialisations
    (each dtype, each constexpr value, each divisibility class) at least once: a greedy cover,
    so a quick run still compiles every code path a single flag opens."""
    from lowprec.kernels.aot_check import _spec_args

    chosen: list[Launch] = []
    seen: set = set()
    for launch in launches:
        args, kwargs = _spec_args(launch)
        feats = {(launch.kernel, i, repr(a)) for i, a in enumerate(args)}
        feats |= {(launch.kernel, k, repr(v)) for k, v in kwargs}
        if not feats <= seen:
            chosen.append(launch)
            seen |= feats
    return chosen


def launch_dtypes(launch: Launch) -> set[torch.dtype]:
    """The dtypes of a launch's tensor arguments."""
    from lowprec.kernels.aot_check import TensorArg

    return {getattr(torch, a.dtype) for a in launch.args if isinstance(a, TensorArg)}


__all__ = ["INPUT_DTYPES", "STREAMING", "WORD_OK", "all_launches", "amax_scale_launches", "cast_transpose_launches",
           "codebook_launches", "covering_subset", "fp8_cast_launches", "launch_dtypes", "mx_launches", "nvfp4_launches",
           "optimizer_launches"]
