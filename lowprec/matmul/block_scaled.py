"""``BlockScaledGemm``: the block-scaled GEMM backend (MXFP8, NVFP4) and the autograd Function
that runs a linear layer's three GEMMs in it.

Same contract as :class:`lowprec.matmul.fp8_gemm.Fp8Gemm` and :class:`lowprec.matmul.gemm.CastGemm`:
``gemm(x, weight, bias)`` is ``F.linear(x, weight, bias)`` up to the format's rounding, with
gradients for all three. Weights, their gradients and the optimizer stay in high precision; only the
operands of the three GEMMs are quantized, each along the dimension its GEMM reduces over, so every
GEMM gets the layout the hardware wants (``x`` is (M, K) after flattening the leading dims, ``W`` is
(N, K), ``dY`` is (M, N)):

===============  ============  ===============================================================
GEMM             reduces over  operands and their blocks
===============  ============  ===============================================================
``Y = X W^T``    K             X: 1 x B along K; W: 1 x B along K (NVFP4: 16 x 16 tiles)
``dX = dY W``    N             dY: 1 x B along N; W: B x 1 along N (W quantized again in that
                               direction; NVFP4 with 16 x 16 tiles: the forward's quantized W)
``dW = dY^T X``  M (tokens)    dY: B x 1 along M; X: B x 1 along M (NVFP4: both after the RHT)
===============  ============  ===============================================================

``mxfp8`` (OCP MX v1.0; TransformerEngine ``MXFP8BlockScaling``, torchao MX training): B = 32,
power-of-two (E8M0) block scales, E4M3 elements by default for every operand: TransformerEngine's
MXFP8 recipe uses E4M3 in the forward and the backward ("the finer-grained scaling provides
sufficient dynamic range without requiring the E5M2 format"; HYBRID, E5M2 for gradients, is the
option). The recipe's ``cast.forward`` (X, W) and ``cast.backward`` (dY) choose. Round to nearest
even everywhere.

``nvfp4`` (NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv 2509.25149): E2M1
elements, B = 16 with E4M3 block scales under one float32 scale per tensor. Its four techniques are
each a switch (:class:`BlockScaling`; recipe ``cast.rht``, ``cast.stochastic_rounding``,
``cast.weight_blocks_2d``; the fourth, BF16 layers, is ``cast.high_precision_format``):

* ``weight_blocks_2d``: W in 16 x 16 tiles, quantized once per call and the same quantized W used by
  the forward and the grad-input GEMM (a 16 x 16 tile's scale does not depend on the direction);
  off: 1 x 16 along K in the forward, 16 x 1 along N in the backward (two different quantized Ws).
* ``rht``: a 16 x 16 random Hadamard transform (Hadamard matrix times random signs, orthogonal;
  :func:`lowprec.rht.rht`, computed as the kernels' butterflies) on both inputs of the
  weight-gradient GEMM along M, fused into their quantization: ``dW = (H dY)^T (H X) = dY^T X`` in exact
  arithmetic, while the transform spreads outliers across each 16-token block before it is
  quantized. M is padded with zero rows to a multiple of 16 first (zero rows add nothing to dW, and
  every transformed row is kept).
* ``stochastic_rounding``: dY is rounded stochastically in both backward GEMMs (unbiased gradients);
  X and W are always rounded to nearest even.

Randomness is reproducible: every random choice (RHT signs, SR) is seeded from the module's
``seed`` buffer (set at construction from ``torch.initial_seed()``, the run's seed, and the layer's
name) and its ``step`` buffer (one per forward call that will be differentiated), so a rerun from
the same seed, or a resume from a checkpoint (both buffers are saved), gives the same bits, while
each step and each layer draws fresh signs and roundings.

Dimensions: :func:`lowprec.matmul.convert.apply_casts` keeps a layer in high precision unless
in_features and out_features are multiples of 16 (FP8's rule: the GPU GEMMs' tile; also NVFP4's
block). The reduction dimension of a GEMM that is not a multiple of the block (K or N not a
multiple of 32 under MXFP8, e.g. the demo Llama's 688-wide MLP; the token count M in every
format) is padded with zeros by the formats: a zero pad changes neither a block's amax nor the
dot product, so the result is the one the hardware computes on the same operands padded to its
tile, and the layer keeps its low-precision GEMMs instead of losing them to a divisibility rule.

NVFP4's per-tensor amax (its float32 scale): under torch.distributed it is all-reduced (MAX) over
``group`` like FP8's (:func:`lowprec.matmul.scaling.all_reduce_amax`), so every rank quantizes
with the same scale. MXFP8 has no per-tensor scale, so nothing to reduce.

State (persistent buffers, loadable with ``torch.load(weights_only=True)``): ``seed``, ``step``,
``nonfinite_inputs`` (operands X, W, dY seen holding NaN/Inf; the name
:func:`lowprec.training.fp8_nonfinite_inputs` sums; with ``debug=True`` they raise instead).

GEMMs: emulated everywhere the hardware has no block-scaled tensor cores: the dequantized operands
(exact in float32) multiplied in float32. On CUDA with compute capability 10.x ("auto" or
``"scaled_mm"``) the MXFP8 GEMMs go through ``torch.nn.functional.scaled_mm`` with
``ScalingType.BlockWise1x32`` and swizzled E8M0 scales (see :func:`_scaled_mm_mxfp8`); anything
it refuses falls back to the emulated GEMM with one warning. NVFP4's GEMMs stay emulated there too
for now: torch's NVFP4 GEMM wants packed ``float4_e2m1fn_x2`` operands, swizzled E4M3 block scales
(``ScalingType.BlockWise1x16``) and the per-tensor scale as a second, ``TensorWise`` scale; that
path is not written yet. A CUDA GPU of another capability runs the emulated GEMM with one
:class:`BlockScaledEmulationWarning` per capability. The quantizers themselves are the kernels'
dispatch functions (:mod:`lowprec.kernels.mx_quantize`, :mod:`lowprec.kernels.nvfp4_quantize`):
Triton on CUDA, the PyTorch reference elsewhere, bit for bit the same.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.kernels.dispatch import capability_of
from lowprec.matmul.fp8_gemm import FP8_DIM_MULTIPLE, smoothing_scales, tensor_amax
from lowprec.matmul.functional import GEMM_BACKENDS, finish_linear_grads
from lowprec.matmul.scaling import all_reduce_amax

BLOCK_FORMATS = ("mxfp8", "nvfp4")
X, W, DY = 0, 1, 2
ROLE_NAMES = ("input X", "weight W", "output gradient dY")
# OCP MX v1.0: 32-element blocks; NVFP4 (arXiv 2509.25149): 16-element blocks and 16x16 RHT.
MX_BLOCK_SIZE = 32
NVFP4_BLOCK_SIZE = 16
RHT_BLOCK = 16
# Block-scaled (MXFP8 / NVFP4) tensor cores: Blackwell data-center GPUs, compute capability 10.x.
BLOCK_SCALED_CAPABILITY_MAJOR = 10
# Purposes that draw randomness, one seed each per step (SR of dY in each backward GEMM; the RHT
# signs shared by both wgrad operands).
_SR_DGRAD, _SR_WGRAD, _RHT = 1, 2, 3
_MASK64 = (1 << 64) - 1
_SEED_BITS = 62  # seeds handed to the formats stay well inside a signed 64-bit integer
_warned: set[tuple] = set()


class BlockScaledEmulationWarning(UserWarning):
    """A block-scaled recipe runs where there are no block-scaled tensor cores (a CUDA GPU below
    compute capability 10.x), or ``torch``'s block-scaled GEMM refused the operands: the emulated
    GEMM runs (same numerics, no speed-up)."""


def _splitmix64(z: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): a bijective 64-bit mixer, so nearby inputs
    (consecutive steps, purposes) give unrelated seeds."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(base: int, step: int, purpose: int) -> int:
    """The seed for one random choice of one call: a hash of the layer's ``base`` seed, the call's
    ``step`` and the ``purpose`` (SR of dY in dgrad / wgrad, RHT signs), in [0, 2**62)."""
    z = _splitmix64(base & _MASK64)
    z = _splitmix64(z ^ (step & _MASK64))
    z = _splitmix64(z ^ purpose)
    return z >> (64 - _SEED_BITS)


@dataclass(frozen=True)
class BlockScaling:
    """How a :class:`BlockScaledGemm` quantizes (built from a recipe's ``[cast]``).

    ``format``: ``"mxfp8"`` or ``"nvfp4"``. ``forward`` / ``backward``: MXFP8's element format for X
    and W / for dY (``"e4m3"`` or ``"e5m2"``; NVFP4 is always E2M1). ``rht``,
    ``stochastic_rounding``, ``weight_blocks_2d``: NVFP4's techniques (see the module docstring);
    MXFP8 uses none of them, so they are stored False for it."""

    format: str = "mxfp8"
    forward: str = "e4m3"
    backward: str = "e4m3"
    rht: bool = False
    stochastic_rounding: bool = False
    weight_blocks_2d: bool = False

    def __post_init__(self) -> None:
        if self.format not in BLOCK_FORMATS:
            raise ValueError(f"block-scaled format must be one of {', '.join(BLOCK_FORMATS)}; got {self.format!r}")
        for what in ("forward", "backward"):
            if getattr(self, what) not in ("e4m3", "e5m2"):
                raise ValueError(f"BlockScaling.{what} must be e4m3 or e5m2 (MXFP8 elements); got {getattr(self, what)!r}")
        if self.format == "mxfp8" and (self.rht or self.stochastic_rounding or self.weight_blocks_2d):
            raise ValueError("rht, stochastic_rounding and weight_blocks_2d are NVFP4 techniques; MXFP8 uses none of them")

    @classmethod
    def from_cast(cls, cast) -> BlockScaling:
        """From a :class:`lowprec.recipes.CastConfig` (``format`` ``"mxfp8"`` or ``"nvfp4"``)."""
        if cast.format == "nvfp4":
            return cls("nvfp4", rht=cast.rht, stochastic_rounding=cast.stochastic_rounding,
                       weight_blocks_2d=cast.weight_blocks_2d)
        return cls(cast.format, forward=cast.forward, backward=cast.backward)

    @property
    def block_size(self) -> int:
        return MX_BLOCK_SIZE if self.format == "mxfp8" else NVFP4_BLOCK_SIZE

    def scheme(self, role: int) -> str:
        """The :func:`lowprec.formats.fake_quantize_block` scheme of operand ``role``."""
        if self.format == "nvfp4":
            return "nvfp4"
        elem = self.backward if role == DY else self.forward
        return "mxfp8" if elem == "e4m3" else "mxfp8_e5m2"


def block_scaled_eligible(in_features: int, out_features: int) -> bool:
    """Whether a linear layer gets block-scaled GEMMs: both dimensions multiples of 16 (the GPU
    GEMMs' tile and NVFP4's block; MXFP8's 32-blocks pad a remainder, see the module docstring)."""
    return in_features % FP8_DIM_MULTIPLE == 0 and out_features % FP8_DIM_MULTIPLE == 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def resolve_block_backend(backend: str, device: torch.device) -> str:
    """What a recipe's ``cast.gemm`` means for a block-scaled GEMM on ``device``: ``"scaled_mm"``
    (torch's block-scaled GEMM) on a CUDA device of compute capability 10.x when this torch has
    ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x32``, asked for by ``"auto"`` or
    ``"scaled_mm"``; ``"emulated"`` everywhere else. A CPU has no block-scaled GEMM (torch 2.13's CPU
    ``scaled_mm`` refuses block scales), so ``"scaled_mm"`` there runs emulated too; a CUDA GPU of
    another capability warns once (:class:`BlockScaledEmulationWarning`)."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"block-scaled GEMM backend must be one of {', '.join(GEMM_BACKENDS)}; got {backend!r}")
    if backend == "emulated":
        return "emulated"
    cap = capability_of(device)
    if cap is None:
        return "emulated"
    if cap[0] == BLOCK_SCALED_CAPABILITY_MAJOR and _torch_has_block_scaled_mm():
        return "scaled_mm"
    key = ("capability", tuple(cap))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lowprec: this GPU (compute capability {cap[0]}.{cap[1]}) has no block-scaled (MXFP8/NVFP4) "
                      f"tensor cores usable here (they need {BLOCK_SCALED_CAPABILITY_MAJOR}.x and a torch with "
                      f"torch.nn.functional.scaled_mm block scaling); block-scaled recipes run the emulated GEMM: "
                      f"same numerics, no speed-up", BlockScaledEmulationWarning, stacklevel=3)
    return "emulated"


def _torch_has_block_scaled_mm() -> bool:
    st = getattr(F, "ScalingType", None)
    return hasattr(F, "scaled_mm") and st is not None and hasattr(st, "BlockWise1x32") and \
        hasattr(F, "SwizzleType") and hasattr(torch, "float8_e8m0fnu")


def _swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales (rows, K/32) in cuBLAS's block-scaling-factor layout (SWIZZLE_32_4_4): the matrix
    padded with zeros to 128-row x 4-column tiles, each tile stored as 32 x (4 x 4): row r of a tile
    goes to position (r % 32, r // 32), its 4 columns kept together (cuBLAS documentation, "1D block
    scaling factors layout")."""
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros((pr, pc), dtype=torch.uint8, device=scales.device)
    padded[:rows, :cols] = scales.view(torch.uint8)
    tiles = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)  # (row tile, col tile, 128, 4)
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)  # r = 32 * j + i -> (i, j)
    return tiles.reshape(-1).view(torch.float8_e8m0fnu)


def _mx_codes(t: torch.Tensor, elem: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 elements, E8M0 scales)`` of a 2-D ``t`` quantized in 1 x 32 blocks along its last
    dimension (a multiple of 32): :class:`lowprec.formats.MXTensor`'s ``data`` and ``scale``."""
    from lowprec.kernels.mx_quantize import mx_quantize

    q = mx_quantize(t.contiguous(), elem, dim=-1, block_size=MX_BLOCK_SIZE)
    return q.data, q.scale.view(torch.float8_e8m0fnu)


def _scaled_mm_mxfp8(a: torch.Tensor, a_elem: str, b: torch.Tensor, b_elem: str) -> torch.Tensor:
    """``a @ b.T`` for high-precision ``a`` (M, R) and ``b`` (N, R), both MXFP8-quantized along R, on
    a compute-capability-10.x GPU: ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x32``
    on both sides, E8M0 scales in the SWIZZLE_32_4_4 layout, ``b`` column-major (a transposed view of
    a row-major (N, R)), float32 output. What it needs (torch 2.13): M, N multiples of 16 and R a
    multiple of 32 (callers pad), not E5M2 x E5M2. Untested here (no such GPU on this machine); any
    refusal falls back to the emulated GEMM with one warning."""
    r = a.shape[1]
    pad = (-r) % MX_BLOCK_SIZE
    if pad:
        a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
    qa, sa = _mx_codes(a, a_elem)
    qb, sb = _mx_codes(b, b_elem)
    st, sw = F.ScalingType.BlockWise1x32, F.SwizzleType.SWIZZLE_32_4_4
    return F.scaled_mm(qa, qb.t(), _swizzle_scales(sa), st, _swizzle_scales(sb), st, swizzle_a=sw, swizzle_b=sw,
                       output_dtype=torch.float32)


class _BlockScaledLinearFn(torch.autograd.Function):
    """``y = x @ w.T + b`` with the three GEMMs block-scaled; ``mod`` is the :class:`BlockScaledGemm`
    (its counters are updated in place, outside autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod, step):  # type: ignore[override]
        n_out, k = weight.shape
        x2 = x.reshape(-1, k).float()
        w = weight.float()
        smooth = smoothing_scales(x2, mod.group) if mod.smooth else None
        if smooth is not None:
            x2 = x2 * smooth
            w = w / smooth
        sc = mod.scaling
        backend = resolve_block_backend(mod.backend, x.device)
        two_d = sc.format == "nvfp4" and sc.weight_blocks_2d
        y = None
        noted = backend == "scaled_mm" and sc.format == "mxfp8"
        if noted:
            mod._note(x2, X)
            mod._note(w, W)
            y = mod._try_scaled_mm(x2, sc.forward, w, sc.forward)
        if y is None:
            xq = mod.quantize(x2, X, dim=1, count=not noted)
            wq = mod.quantize(w, W, dim=1, block_2d=two_d, count=not noted)
            y = xq @ wq.t()
        else:
            wq = None
        if bias is not None:
            y = y + bias.float()
        ctx.mod, ctx.step, ctx.backend, ctx.has_bias = mod, step, backend, bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        # Saved in the caller's dtype (widened again in the backward: exact), so a bf16 model's
        # activations are not kept twice as large; smoothed operands are new tensors anyway.
        x_save, w_save = (x.reshape(-1, k), weight) if smooth is None else (x2, w)
        ctx.save_for_backward(x_save, w_save, wq if two_d else None, smooth)
        return y.reshape(*x.shape[:-1], n_out).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        mod, step = ctx.mod, ctx.step
        sc = mod.scaling
        x2, w, wq2d, smooth = ctx.saved_tensors
        x2, w = x2.float(), w.float()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = gy.reshape(-1, gy.shape[-1]).float()
        sr = sc.format == "nvfp4" and sc.stochastic_rounding
        gx = gw = None
        noted = False
        if need_x:
            gx = None
            if ctx.backend == "scaled_mm" and sc.format == "mxfp8":
                mod._note(dy2, DY)
                noted = True
                gx = mod._try_scaled_mm(dy2, sc.backward, w.t(), sc.forward)
            if gx is None:
                dyq = mod.quantize(dy2, DY, dim=1, count=not noted, stochastic=sr, seed=mod.seed_for(step, _SR_DGRAD))
                noted = True
                wq = wq2d if wq2d is not None else mod.quantize(w, W, dim=0, count=False)
                gx = dyq @ wq
        if need_w:
            a, b = dy2, x2
            rht_seed = None
            if sc.format == "nvfp4" and sc.rht:  # the transform is fused into the quantization
                a, b = _pad_rows(a, RHT_BLOCK), _pad_rows(b, RHT_BLOCK)
                rht_seed = mod.seed_for(step, _RHT)
            gw = None
            if ctx.backend == "scaled_mm" and sc.format == "mxfp8":
                if not noted:
                    mod._note(a, DY)
                    noted = True
                gw = mod._try_scaled_mm(a.t(), sc.backward, b.t(), sc.forward)
            if gw is None:
                aq = mod.quantize(a, DY, dim=0, count=not noted, stochastic=sr, seed=mod.seed_for(step, _SR_WGRAD),
                                  rht_seed=rht_seed)
                bq = mod.quantize(b, X, dim=0, count=False, rht_seed=rht_seed)
                gw = aq.t() @ bq
        gx, gw, gb = finish_linear_grads(ctx, gx, gw, dy2, smooth, need_b)
        return gx, gw, gb, None, None


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def rht_pair(a: torch.Tensor, b: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight-gradient operands (M, N) and (M, K) as the NVFP4 GEMM transforms them before
    quantizing: zero-padded along M to a multiple of 16, then the same 16 x 16 random Hadamard
    transform along M (:func:`lowprec.kernels.nvfp4_quantize.rht16`, the kernels' butterfly form of
    :func:`lowprec.rht.rht`), so ``a'^T b' = a^T H^T H b = a^T b`` in exact arithmetic."""
    from lowprec.kernels.nvfp4_quantize import rht16

    a, b = _pad_rows(a, RHT_BLOCK), _pad_rows(b, RHT_BLOCK)
    return rht16(a, seed, dim=0), rht16(b, seed, dim=0)


class BlockScaledGemm(nn.Module):
    """Block-scaled (MXFP8 / NVFP4) GEMM backend for a linear-like module: ``gemm(x, weight, bias)``
    == ``F.linear`` up to the format's rounding, with gradients. See the module docstring."""

    def __init__(self, scaling: BlockScaling | None = None, backend: str = "auto", smooth: bool = False,
                 debug: bool = False, name: str = "", group=None, seed: int | None = None) -> None:
        super().__init__()
        self.scaling = scaling if scaling is not None else BlockScaling()
        if not isinstance(self.scaling, BlockScaling):
            raise TypeError(f"BlockScaledGemm takes a BlockScaling; got {type(self.scaling).__name__}")
        if backend not in GEMM_BACKENDS:
            raise ValueError(f"block-scaled GEMM backend must be one of {', '.join(GEMM_BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.smooth = smooth
        self.debug = debug
        self.name = name
        self.group = group  # process group for the amax all-reduce (None: the default group)
        # The run's seed (torch.manual_seed's, read without drawing) mixed with the layer's name, so
        # layers draw different signs and roundings and a rerun with the same seed draws the same.
        base = torch.initial_seed() if seed is None else int(seed)
        self._seed0 = _splitmix64((base ^ zlib.crc32(name.encode())) & _MASK64) >> 1  # fits an int64
        self.register_buffer("seed", torch.empty((), dtype=torch.int64))
        self.register_buffer("step", torch.empty((), dtype=torch.int64))
        self.register_buffer("nonfinite_inputs", torch.empty(3, dtype=torch.int64))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initial state in place: the construction seed, step 0, counters 0 (torch's name for
        it: FSDP calls it on modules materialised from the meta device without a checkpoint)."""
        self.seed.fill_(self._seed0)
        self.step.zero_()
        self.nonfinite_inputs.zero_()

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.dim() != 2:
            raise ValueError(f"{self._who()}: weight must be 2-D (out_features, in_features); got {tuple(weight.shape)}")
        n_out, k = weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"{self._who()}: input's last dimension is {x.shape[-1]}, the weight expects {k}")
        if bias is not None and tuple(bias.shape) != (n_out,):
            raise ValueError(f"{self._who()}: bias must have shape ({n_out},); got {tuple(bias.shape)}")
        step = -1
        differentiated = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        if differentiated:  # only a call with a backward draws randomness; eval calls leave the counter
            step = int(self.step)
            with torch.no_grad():
                self.step += 1
        return _BlockScaledLinearFn.apply(x, weight, bias, self, step)

    def extra_repr(self) -> str:
        s = self.scaling
        if s.format == "mxfp8":
            what = f"mxfp8 {s.forward}/{s.backward}"
        else:
            on = [n for n, v in (("rht", s.rht), ("sr", s.stochastic_rounding), ("2d_weights", s.weight_blocks_2d)) if v]
            what = f"nvfp4 {'+'.join(on) or 'plain'}"
        return f"{what}, gemm={self.backend}{', smooth_swiglu' if self.smooth else ''}{', debug' if self.debug else ''}"

    def _who(self) -> str:
        return f"BlockScaledGemm {self.name!r}" if self.name else "BlockScaledGemm"

    # -- randomness -----------------------------------------------------------------------------
    def seed_for(self, step: int, purpose: int) -> int:
        """The seed of one random choice (``purpose``: SR of dY in dgrad 1 / wgrad 2, RHT signs 3)
        of the call numbered ``step``: a function of the ``seed`` buffer, so reproducible."""
        return derive_seed(int(self.seed), step, purpose)

    # -- quantization ---------------------------------------------------------------------------
    def _note(self, t: torch.Tensor, role: int) -> None:
        """Count (or, in debug mode, raise on) NaN/Inf in operand ``role`` (one pass: its amax)."""
        amax = tensor_amax(t)
        bad = ~torch.isfinite(amax)
        if self.debug and bool(bad):
            raise FloatingPointError(
                f"{self._who()}: the {ROLE_NAMES[role]} contains NaN or Inf (amax = {amax.item()}); cast.debug is on, "
                f"so lowprec stops here instead of counting it in nonfinite_inputs")
        with torch.no_grad():
            self.nonfinite_inputs[role] += bad.to(torch.int64)

    def _tensor_amax(self, t: torch.Tensor) -> torch.Tensor | None:
        """NVFP4's per-tensor amax under torch.distributed: max |t| over the finite values (as
        :func:`lowprec.formats.nvfp4_quantize` computes it), all-reduced (MAX) over ``group`` so every
        rank uses one tensor scale; None in a single process (the format computes it itself)."""
        if not _distributed():
            return None
        a = t.detach().abs()
        local = torch.where(torch.isfinite(a), a, 0.0).amax() if a.numel() else a.new_zeros(())
        return all_reduce_amax(local.float(), self.group)

    def quantize(self, t: torch.Tensor, role: int, dim: int, *, block_2d: bool = False, count: bool = True,
                 stochastic: bool = False, seed: int | None = None, rht_seed: int | None = None) -> torch.Tensor:
        """``t`` (2-D, float32) quantized as operand ``role`` in blocks along ``dim`` (or 16 x 16 tiles),
        dequantized to float32: what the emulated GEMM multiplies. ``count``: check it for NaN/Inf.
        ``rht_seed`` (NVFP4): quantize the 16x16 RHT of ``t`` along ``dim`` instead (``dim``'s length a
        multiple of 16). A block holding NaN/Inf dequantizes to NaN (the formats' rule), so the GEMM
        propagates it. The quantizers are the kernels' dispatch functions (Triton on CUDA, the
        :mod:`lowprec.formats` reference elsewhere, bit-identical)."""
        if count:
            self._note(t, role)
        rounding = "stochastic" if stochastic else "nearest"
        seed = seed if stochastic else None
        sc = self.scaling
        # Quantize-dequantize in one pass (compiled on the CPU, the kernels' quantize + dequantize
        # elsewhere): bit-identical to ``q.dequantize()``, without packing codes the GEMM unpacks.
        from lowprec.matmul.block_fake_quant import mx_fake_quantize, nvfp4_fake_quantize

        if sc.format == "nvfp4":
            from lowprec.kernels.nvfp4_quantize import rht16

            amax = self._tensor_amax(t if rht_seed is None else rht16(t, rht_seed, dim=dim))
            return nvfp4_fake_quantize(t, dim=dim, block_2d=block_2d, tensor_amax=amax, rounding=rounding, seed=seed,
                                       rht_seed=rht_seed)
        elem = sc.backward if role == DY else sc.forward
        return mx_fake_quantize(t, elem, dim=dim, rounding=rounding, seed=seed)

    def _try_scaled_mm(self, a: torch.Tensor, a_elem: str, b: torch.Tensor, b_elem: str) -> torch.Tensor | None:
        """``a @ b.T`` through torch's MXFP8 GEMM, or None (then the caller emulates) when torch
        refuses the operands; warns once per refusal message."""
        if a_elem == b_elem == "e5m2" or a.shape[0] % FP8_DIM_MULTIPLE or b.shape[0] % FP8_DIM_MULTIPLE:
            return None
        try:
            return _scaled_mm_mxfp8(a, a_elem, b, b_elem)
        except (RuntimeError, ValueError, TypeError, AttributeError) as e:
            key = ("refused", type(e).__name__, str(e)[:200])
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"lowprec: torch's block-scaled GEMM refused an MXFP8 GEMM of {self._who()} "
                              f"({type(e).__name__}: {str(e)[:200]}); running the emulated GEMM",
                              BlockScaledEmulationWarning, stacklevel=2)
            return None


__all__ = ["BlockScaledGemm", "BlockScaling", "BlockScaledEmulationWarning", "block_scaled_eligible",
           "derive_seed", "resolve_block_backend", "rht_pair", "BLOCK_FORMATS"]
