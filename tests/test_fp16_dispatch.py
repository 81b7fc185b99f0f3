"""16-bit GEMMs (``CastGemm``: unit-fp16, the bf16 cast format): real fp16/bf16 GEMMs where the
device has them, the emulation elsewhere, chosen in one place
(:func:`lowprec.matmul.functional.resolve_cast_backend`).

No GPU here: the native path is forced with :func:`force_cast_backend` and runs torch's CPU
fp16/bf16 matmul, and a dispatch mode records the dtype of every GEMM torch runs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowprec
from lowprec.matmul import CastGemm
from lowprec.matmul.functional import force_cast_backend, resolve_cast_backend
from lowprec.matmul.linear import LowPrecisionLinear

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every mm / addmm / bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            mats = args[1:3] if func is torch.ops.aten.addmm.default else args[:2]
            self.seen.append(tuple(t.dtype for t in mats))
        return func(*args, **(kwargs or {}))


def test_dispatch_is_decided_in_one_place():
    assert resolve_cast_backend(torch.float16, torch.device("cpu")) == "emulated"
    assert resolve_cast_backend(torch.bfloat16, torch.device("cpu")) == "emulated"
    with force_cast_backend("native"):
        assert resolve_cast_backend(torch.float16, torch.device("cpu")) == "native"
        with force_cast_backend("emulated"):
            assert resolve_cast_backend(torch.float16, torch.device("cpu")) == "emulated"
        assert resolve_cast_backend(torch.float16, torch.device("cpu")) == "native"
    assert resolve_cast_backend(torch.float16, torch.device("cpu")) == "emulated"
    with pytest.raises(ValueError, match="native, emulated"):
        with force_cast_backend("fast"):
            pass


def _unit_fp16_model():
    pytest.importorskip("transformers")
    from lowprec.models import demo_llama

    torch.manual_seed(0)
    return lowprec.convert(demo_llama(seed=0, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=2, num_key_value_heads=2), "unit-fp16")


def _step(model, ids):
    from lowprec.training import lm_loss

    loss = lm_loss(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_native_path_runs_every_cast_gemm_in_fp16_and_matches_the_emulation():
    model = _unit_fp16_model()
    n_cast = sum(isinstance(m, CastGemm) for m in model.modules())
    assert n_cast == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays float32
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))

    with GemmDtypes() as emulated_mode:
        emu_loss, emu_grads = _step(model, ids)
    assert all(torch.float16 not in d for d in emulated_mode.seen)  # the emulation multiplies in float32

    with force_cast_backend("native"), GemmDtypes() as native_mode:
        nat_loss, nat_grads = _step(model, ids)
    half = [d for d in native_mode.seen if d == (torch.float16, torch.float16)]
    other = [d for d in native_mode.seen if d != (torch.float16, torch.float16)]
    assert len(half) == 3 * n_cast, native_mode.seen  # forward, grad-input and grad-weight of each
    assert all(d == (torch.float32, torch.float32) for d in other) and len(other) <= 3, other  # lm_head only
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32

    # same rounding points: agreement to fp16's precision (2**-11 relative per rounding)
    torch.testing.assert_close(nat_loss, emu_loss, rtol=2e-3, atol=0)
    for name, g in emu_grads.items():
        torch.testing.assert_close(nat_grads[name], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("fmt,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_saved_operands_are_16_bit(fmt, dtype, backend):
    torch.manual_seed(0)
    layer = LowPrecisionLinear(32, 16, bias=True, gemm=CastGemm(fmt))
    x = torch.randn(4, 32, requires_grad=True)
    saved: list[torch.dtype] = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with force_cast_backend(backend), GemmDtypes() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
    assert saved == [dtype, dtype]
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    want = (dtype, dtype) if backend == "native" else (torch.float32, torch.float32)
    assert mode.seen and all(d == want for d in mode.seen), mode.seen


def test_native_saturates_like_the_emulation():
    layer = LowPrecisionLinear(16, 16, bias=False, gemm=CastGemm("fp16"))
    with torch.no_grad():
        layer.weight.fill_(300.0)
    x = torch.full((2, 16), 300.0)  # 16 * 300 * 300 = 1.44e6 > fp16 max 65504
    with force_cast_backend("native"):
        native = layer(x)
    with force_cast_backend("emulated"):
        emulated = layer(x)
    assert torch.equal(native, emulated)
    assert native.max().item() == 65504.0
