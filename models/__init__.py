"""The nine workload models of stitch, behind a lazy registry.

Each workload is a small but faithful PyTorch model of one source paper (see
`seeds/README.md` and `shared/WORKLOADS.md`), packaged with deterministic weights,
synthetic example inputs, targets and a loss.  Everything data-dependent (sampling,
kNN, k-means, calibration, rdkit motif extraction) happens in the factory, so that
`torch.export.export(w.model, w.example_inputs, strict=False).run_decompositions()`
gives a static core-aten graph whose memory-intensive chains are what stitch fuses.

    >>> import models
    >>> w = models.get("bert")
    >>> out = w.model(*w.example_inputs)
    >>> w.loss_fn(out, w)

Invariants:
- importing `models` builds nothing; `get(name)` imports one module and calls its
  `build()`;
- every model is in eval mode and built under `torch.manual_seed`, so two `get` calls
  give identical weights and inputs;
- `names()` lists the nine workloads in the order of WORKLOADS.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Workload", "get", "names", "run"]


@dataclass
class Workload:
    """One workload: a model, inputs for it, and how to score its outputs."""

    name: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[Any, Workload], torch.Tensor]
    paper: str
    config: str
    chains: list[str]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    # Factory-time artefacts a test or a user may want (k-means groups, indices, ...).
    extras: dict[str, Any] = field(default_factory=dict)

    def forward(self) -> Any:
        """Runs the model on its example inputs (no grad)."""
        with torch.no_grad():
            return self.model(*self.example_inputs)

    def loss(self, outputs: Any | None = None) -> torch.Tensor:
        """The workload's loss (or metric) for `outputs`, running the model if None."""
        if outputs is None:
            outputs = self.forward()
        return self.loss_fn(outputs, self)


# name -> module under models/, in the order of WORKLOADS.md §1-9.
_MODULES: dict[str, str] = {
    "molcpt": "models.molcpt",
    "adder_quant": "models.adder_quant",
    "visual_lexical": "models.visual_lexical",
    "bert": "models.bert",
    "rffs_net": "models.rffs_net",
    "charformer": "models.charformer",
    "rcrn": "models.rcrn",
    "rzcr": "models.rzcr",
    "attention_round": "models.attention_round",
}


def names() -> list[str]:
    """All workload names, in the order of WORKLOADS.md."""
    return list(_MODULES)


def get(name: str, **kwargs: Any) -> Workload:
    """Builds workload `name` (keyword arguments go to its module's `build`)."""
    try:
        module_name = _MODULES[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(_MODULES)}") from None
    module = importlib.import_module(module_name)
    workload = module.build(**kwargs)
    assert isinstance(workload, Workload) and workload.name == name
    return workload


def run(name: str) -> tuple[Any, torch.Tensor]:
    """Builds workload `name`, runs it eagerly and returns (outputs, loss)."""
    w = get(name)
    out = w.forward()
    return out, w.loss_fn(out, w)
