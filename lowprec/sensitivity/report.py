"""``SensitivityReport``: a score per layer and bit width, printable, JSON-able and plottable."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowprec.text_table import aligned_table

METHODS = ("hawq", "pqi", "measured")


@dataclass
class SensitivityReport:
    """Scores of one method: ``scores[layer][bits]`` is the predicted (``hawq``, ``pqi``) or measured
    loss increase from quantising that layer alone to symmetric per-output-channel INT-``bits``.

    ``n_params[layer]`` and ``rows[layer]`` (output channels, one fp32 scale each) size a plan;
    ``extra`` holds per-layer diagnostics (Hessian traces, probes); ``meta`` the run's settings,
    timings and counts.
    """

    method: str
    bits: tuple[int, ...]
    scores: dict[str, dict[int, float]]
    n_params: dict[str, int]
    rows: dict[str, int]
    base_loss: float = math.nan
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = tuple(int(b) for b in self.bits)
        missing = [n for n in self.scores if set(self.scores[n]) != set(self.bits)]
        if missing:
            raise ValueError(f"report layers {missing} do not have a score for every bit width {self.bits}")
        for d, what in ((self.n_params, "n_params"), (self.rows, "rows")):
            absent = [n for n in self.scores if n not in d]
            if absent:
                raise ValueError(f"report {what} is missing layers {absent}")

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    def score(self, layer: str, bits: int) -> float:
        return self.scores[layer][bits]

    def size_bytes(self, layer: str, bits: int) -> int:
        """Storage of one layer's weight at ``bits``: packed codes plus one fp32 scale per output channel."""
        return math.ceil(self.n_params[layer] * bits / 8) + 4 * self.rows[layer]

    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for n in self.layers:
            r: dict[str, Any] = {"layer": n, "params": self.n_params[n]}
            for b in self.bits:
                r[f"int{b}"] = self.scores[n][b]
            for k, v in self.extra.get(n, {}).items():
                if isinstance(v, (int, float, str)):
                    r[k] = v
            rows.append(r)
        return rows

    def table(self) -> str:
        rows = self.to_rows()
        cols = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
        head = f"sensitivity ({self.method}): loss increase per layer and bit width; base loss {self.base_loss:.6g}"
        return "\n".join([head, *aligned_table(cols, cells)])

    def __str__(self) -> str:
        return self.table()

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": list(self.bits),
            "base_loss": self.base_loss,
            "layers": [
                {"name": n, "n_params": self.n_params[n], "rows": self.rows[n],
                 "scores": {str(b): self.scores[n][b] for b in self.bits}, "extra": self.extra.get(n, {})}
                for n in self.layers
            ],
            "meta": self.meta,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        try:
            bits = tuple(int(b) for b in d["bits"])
            layers = d["layers"]
            return cls(
                method=str(d["method"]), bits=bits,
                scores={ly["name"]: {int(b): float(s) for b, s in ly["scores"].items()} for ly in layers},
                n_params={ly["name"]: int(ly["n_params"]) for ly in layers},
                rows={ly["name"]: int(ly["rows"]) for ly in layers},
                base_loss=float(d.get("base_loss", math.nan)),
                extra={ly["name"]: dict(ly.get("extra", {})) for ly in layers},
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a sensitivity report: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, source: str | Path) -> SensitivityReport:
        """From JSON text or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"sensitivity report file {str(path)!r} does not exist")
            text = path.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"sensitivity report is not valid JSON: {e}") from None
        return cls.from_dict(d)

    # -- plot ---------------------------------------------------------------------------------
    def plot(self, path: str | Path, log: bool = True) -> Path:
        """A grouped bar chart (layer x bit width) written as PNG; matplotlib is imported here only."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Patch
        except ImportError as e:  # pragma: no cover
            raise ImportError("plotting needs matplotlib: pip install 'lowprec[plot]'") from e
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n, k = len(self.layers), len(self.bits)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.12 * n * k + 2)), 5.0))
        width = 0.8 / k
        handles = []
        for j, b in enumerate(self.bits):
            raw = [self.scores[ly][b] for ly in self.layers]
            vals = [max(abs(v), 1e-12) for v in raw] if log else raw
            bars = ax.bar([i + (j - (k - 1) / 2) * width for i in range(n)], vals, width)
            handles.append(Patch(facecolor=bars.patches[0].get_facecolor(), label=f"int{b}"))
            if log:  # a negative score (quantising lowered the loss) is drawn hatched
                for bar, v in zip(bars, raw):
                    if v < 0:
                        bar.set_hatch("///")
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(n))
        labels = [ly.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                  for ly in self.layers]
        ax.set_xticklabels(labels, rotation=90, fontsize=6 if n > 12 else 8)
        ax.set_ylabel(("|score| (hatched: negative)" if log else "score") + ", loss increase")
        ax.set_title(f"sensitivity by {self.method}")
        ax.legend(handles=handles, fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
