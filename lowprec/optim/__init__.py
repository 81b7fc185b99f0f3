"""Quantized optimizer states: AdamW with 4-bit, 8-bit and FP8 moments.

``AdamW4bit`` / ``AdamW8bit`` / ``AdamWFp8`` are ``torch.optim.Optimizer`` subclasses; the
quantizers (:mod:`lowprec.optim.state_quant`) and step functions
(:mod:`lowprec.optim.functional`) are pure functions on tensors.
"""

from lowprec.optim.adamw import (
    DEFAULT_MIN_QUANT_SIZE,
    EMBEDDING_PATTERNS,
    AdamW4bit,
    AdamW8bit,
    AdamWFp8,
    QuantizedAdamW,
)
from lowprec.optim.state_quant import STATE_FORMATS, StateFormat

__all__ = [
    "AdamW4bit",
    "AdamW8bit",
    "AdamWFp8",
    "QuantizedAdamW",
    "DEFAULT_MIN_QUANT_SIZE",
    "EMBEDDING_PATTERNS",
    "STATE_FORMATS",
    "StateFormat",
]
