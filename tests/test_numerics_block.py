"""The block-scaled rows of ``lowprec inspect``: ``tensor_stats`` under "mx" and "nvfp4".

The saturated / underflowed fractions are checked against the real quantizers
(``mx_quantize`` / ``nvfp4_quantize``, round to nearest): an element underflows exactly when it
is nonzero and its quantize-dequantize round trip is 0, and saturates exactly when it comes back
as its block's largest value while lying beyond that value's rounding interval. The oracles read
the block scales from the quantized tensors, not from ``lowprec.numerics``.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowprec import cli, numerics
from lowprec.formats import E2M1, E4M3, MX_BLOCK, NVFP4_BLOCK, get_format, mx_quantize, nvfp4_quantize
from lowprec.recipes import resolve

TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "max_position_embeddings": 64}


# ----------------------------------------------------------------------------------------------
# Test tensors (bf16-representable float32, as a bf16 model's activations are)
# ----------------------------------------------------------------------------------------------


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _normal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _bf16(torch.randn(rows, cols, generator=g))


def _student_t(rows: int, cols: int, seed: int, df: int = 2) -> torch.Tensor:
    """Heavy-tailed: z / sqrt(chi2_df / df)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(df, rows, cols, generator=g).pow(2).sum(0)
    return _bf16(z / (chi2 / df).sqrt())


def _wide(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Each element with its own power-of-two magnitude in [2**-30, 1]: many elements far below
    their block's amax, so MX underflows are common (not just 0 == 0)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-30, 1, (rows, cols), generator=g).float()
    return _bf16(torch.randn(rows, cols, generator=g)) * torch.exp2(e)


TENSORS = {
    "normal": lambda: _normal(8, 64, 0),
    "student_t": lambda: _student_t(8, 64, 1),
    "ragged_40": lambda: _bf16(_normal(6, 40, 2) * 3.0),
    "wide": lambda: _wide(8, 64, 3),
    "wide_ragged_40": lambda: _wide(6, 40, 4),
}


# ----------------------------------------------------------------------------------------------
# Oracles from the quantizers
# ----------------------------------------------------------------------------------------------


def _decode_scale(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized x, per-element block decode scale d in float64) from the real quantizer."""
    cols = x.shape[-1]
    if scaling == "mx":
        q = mx_quantize(x, "e4m3", rounding="nearest")
        code = q.scale.to(torch.int64)
        d = torch.where(code == 255, float("nan"), torch.ldexp(torch.ones_like(code, dtype=torch.float64), code - 127))
        block = MX_BLOCK
    else:
        q = nvfp4_quantize(x, rounding="nearest")
        d = q.block_scale.double() / q.tensor_scale.double()
        block = NVFP4_BLOCK
    return q.dequantize(), d.repeat_interleave(block, dim=-1)[:, :cols]


def _oracle(x: torch.Tensor, scaling: str) -> tuple[float, float]:
    """(saturated, underflowed) fractions read off the quantizer's round trip."""
    fmt = E4M3 if scaling == "mx" else E2M1
    xq, d = _decode_scale(x, scaling)
    half_ulp_at_max = 0.5 * fmt.step_at(torch.tensor(fmt.max)).item()
    block_max = fmt.max * d
    at_max = (xq.abs().double() == block_max) & (block_max > 0)  # a zero block scale gives zeros: underflow
    beyond = x.abs().double() > (fmt.max + half_ulp_at_max) * d
    saturated = (torch.isfinite(x) & at_max & beyond).sum().item()
    underflowed = ((x != 0) & (xq == 0)).sum().item()
    return saturated / x.numel(), underflowed / x.numel()


# ----------------------------------------------------------------------------------------------
# tensor_stats against the quantizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TENSORS))
@pytest.mark.parametrize("scaling,fmt", [("mx", "e4m3"), ("nvfp4", "e2m1")])
def test_block_stats_match_the_quantizer_round_trip(name, scaling, fmt):
    x = TENSORS[name]()
    s = numerics.tensor_stats(x, fmt, scaling)
    sat, und = _oracle(x, scaling)
    assert (s["saturated"], s["underflowed"]) == (sat, und)
    assert s["nonfinite"] == 0.0


@pytest.mark.parametrize("scaling,fmt,tensor,field", [
    ("mx", "e4m3", "normal", "saturated"),  # a block amax's mantissa above 1.8125 (464 / 256) clips
    ("mx", "e4m3", "wide", "underflowed"),  # elements 2**18 below their block's amax
    ("nvfp4", "e2m1", "normal", "underflowed"),  # E2M1: anything under amax / 24 rounds to zero
])
def test_the_oracle_comparisons_are_not_vacuous(scaling, fmt, tensor, field):
    """The round-trip equality above means something: these fractions are not zero."""
    assert numerics.tensor_stats(TENSORS[tensor](), fmt, scaling)[field] > 0


def test_mx_hand_built_block():
    # One MX block of 32: amax 4000 = 500 * 2**3, so the E8M0 scale is 2**(11 - 8) = 2**3 and the
    # amax scales to 500 > 464 (448 + half of E4M3's ULP 32 at 448): clipped. 3680 scales to 460,
    # inside 448's rounding interval: not counted. 2**-7 scales to 2**-10, half E4M3's smallest
    # subnormal 2**-9: rounds to zero (ties to even); 1.25 * 2**-7 scales above it and survives.
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([4000.0, -3680.0, 2.0**-7, -1.25 * 2.0**-7, 1.0, 100.0])
    s = numerics.tensor_stats(x, "e4m3", "mx")
    assert (s["saturated"], s["underflowed"]) == (1 / 32, 1 / 32)
    assert torch.equal(numerics._block_decode(x, E4M3, "mx"), torch.full((1, 32), 2.0**3))
    xq = mx_quantize(x, "e4m3").dequantize()
    assert xq[0, :4].tolist() == [3584.0, -3584.0, 0.0, -(2.0**-6)]  # both large ones come back as 448 * 2**3
    assert (s["saturated"], s["underflowed"]) == _oracle(x, "mx")
    # unscaled, 4000 and 3680 clip and nothing underflows (2**-7 is an E4M3 normal): the scaling matters
    assert numerics.tensor_stats(x, "e4m3", "none")["saturated"] == 2 / 32


def test_nvfp4_hand_built_blocks():
    # Tensor amax 2688 = 448 * 6 gives the tensor scale S = 1. Block 0: scale e4m3(2688 / 6) = 448,
    # so 100 scales to 0.223 and 112 to 0.25 (half E2M1's smallest subnormal 0.5, a tie to zero):
    # both underflow; 113 survives. Block 1: amax 8.25 * 2**-9 wants the scale 1.375 * 2**-9, an
    # E4M3 subnormal that rounds down to 2**-9, so the amax scales to 8.25 > 7 (6 + half the ULP 2):
    # clipped; 6.5 * 2**-9 scales to 6.5 < 7 and rounds to 6: not counted.
    x = torch.zeros(1, 48)  # block 2 all zeros: nothing counted
    x[0, :4] = torch.tensor([2688.0, 100.0, -112.0, 113.0])
    x[0, 16:18] = torch.tensor([8.25 * 2.0**-9, -6.5 * 2.0**-9])
    s = numerics.tensor_stats(x, "e2m1", "nvfp4")
    assert (s["saturated"], s["underflowed"]) == (1 / 48, 2 / 48)
    decode = numerics._block_decode(x, E2M1, "nvfp4")
    assert decode[0, 0].item() == 448.0 and decode[0, 16].item() == 2.0**-9
    xq = nvfp4_quantize(x).dequantize()
    assert xq[0, 1:4].abs().tolist() == [0.0, 0.0, 224.0]  # 113 / 448 = 0.252 rounds up to 0.5
    assert xq[0, 16:18].tolist() == [6 * 2.0**-9, -6 * 2.0**-9]  # the clipped and the kept one: both 6
    assert (s["saturated"], s["underflowed"]) == _oracle(x, "nvfp4")


@pytest.mark.parametrize("scaling,fmt", [("mx", "e4m3"), ("nvfp4", "e2m1")])
def test_nan_and_inf_blocks_count_as_nonfinite_only(scaling, fmt):
    """A block holding NaN or Inf decodes to NaN: its huge and tiny finite neighbours are neither
    saturated nor underflowed, and the other blocks are unaffected."""
    x = _normal(4, 64, 5)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), 1e30, 1e-30
    x[1, 40], x[1, 41] = float("inf"), -1e-30
    s = numerics.tensor_stats(x, fmt, scaling)
    assert s["nonfinite"] == 2 / x.numel()
    assert (s["saturated"], s["underflowed"]) == _oracle(x, scaling)
    clean = x.clone()
    clean[0, :32], clean[1, 32:] = 0.0, 0.0  # zero the NaN/Inf blocks (MX 32 wide; NVFP4 blocks lie inside)
    if scaling == "mx":  # the NaN/Inf blocks contribute nothing: same counts as with them zeroed
        c = numerics.tensor_stats(clean, fmt, scaling)
        assert (s["saturated"], s["underflowed"]) == (c["saturated"], c["underflowed"])


def test_ragged_tail_counts_real_elements_only():
    """40 columns: the quantizer pads the second block with zeros; the fractions are over the 40."""
    x = torch.full((2, 40), 1.0)
    x[:, 39] = 2.0**-20  # in the ragged MX block (amax 1): scales to 2**-12, below 2**-10: underflows
    s = numerics.tensor_stats(x, "e4m3", "mx")
    assert s["underflowed"] == 2 / 80 and s["saturated"] == 0.0


# ----------------------------------------------------------------------------------------------
# formats_for
# ----------------------------------------------------------------------------------------------


def test_formats_for_block_scaled_recipes():
    assert numerics.formats_for(resolve("mxfp8")) == ("e4m3", "e4m3", "mx")
    assert numerics.formats_for(resolve("nvfp4")) == ("e2m1", "e2m1", "nvfp4")
    assert numerics.formats_for(resolve("fp8")) == ("e4m3", "e5m2", "current")  # unchanged
    # user overrides still win
    assert numerics.formats_for(resolve("mxfp8"), backward="e5m2") == ("e4m3", "e5m2", "mx")
    assert numerics.formats_for(resolve("nvfp4"), scaling="current") == ("e2m1", "e2m1", "current")


@pytest.mark.parametrize("recipe,kwargs,names", [
    (None, dict(forward="e4m3", scaling="nvfp4"), ("e4m3", "nvfp4")),
    ("nvfp4", dict(forward="e4m3"), ("e4m3", "nvfp4")),
    ("mxfp8", dict(backward="fp16"), ("fp16", "mx")),
    (None, dict(forward="bf16", scaling="mx"), ("bf16", "mx")),
])
def test_formats_for_refuses_formats_a_block_scaling_cannot_take(recipe, kwargs, names):
    with pytest.raises(ValueError) as e:
        numerics.formats_for(resolve(recipe) if recipe else None, **kwargs)
    assert all(repr(n) in str(e.value) for n in names)


def test_formats_for_still_refuses_int_and_codebook_formats():
    for name in ("int4", "nf4"):
        with pytest.raises(ValueError, match=name):
            numerics.formats_for(resolve("nvfp4"), forward=name)


def test_tensor_stats_refuses_bad_combinations():
    x = torch.ones(2, 32)
    with pytest.raises(ValueError, match="'e4m3'.*'nvfp4'"):
        numerics.tensor_stats(x, "e4m3", "nvfp4")
    with pytest.raises(ValueError, match="scaling must be one of"):
        numerics.tensor_stats(x, "e4m3", "mxfp8")
    assert get_format("e2m1") is E2M1  # the element format the nvfp4 rows name


# ----------------------------------------------------------------------------------------------
# lowprec inspect end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.mark.parametrize("recipe,fwd,bwd,scaling", [("mxfp8", "e4m3", "e4m3", "mx"),
                                                    ("nvfp4", "e2m1", "e2m1", "nvfp4")])
def test_inspect_block_scaled_recipe(tmp_path, tiny_config, capsys, recipe, fwd, bwd, scaling):
    out = tmp_path / "inspect"
    assert cli.main(["inspect", recipe, "--config", tiny_config, "--batch-size", "2", "--seq-len", "32",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    title = next(line for line in printed.splitlines() if line.startswith("numerics of"))
    assert f"recipe '{recipe}': forward {fwd}, gradients {bwd}, scaling '{scaling}'" in title
    m = json.loads((out / "metrics.json").read_text())
    assert (m["forward_format"], m["backward_format"], m["scaling"]) == (fwd, bwd, scaling)
    rows = [r for r in m["rows"] if r["cast"]]
    assert rows and all(r["format"] in (fwd, bwd) for r in rows)
    if recipe == "nvfp4":  # E2M1's range of 12: a normal-ish tensor always loses some elements to zero
        assert any(r["underflowed"] > 0 for r in rows)
