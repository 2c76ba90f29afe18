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

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Workload", "batchnorm_statistics", "get", "names", "run"]


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


@contextlib.contextmanager
def batchnorm_statistics(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Calibrates `module`'s BatchNorm running statistics: the train-mode passes run inside
    this block set them to the cumulative average over those passes (momentum None), and on
    leaving, every BatchNorm gets its own momentum back and `module` is in eval mode.

    The momentum must come back: a BatchNorm left with momentum None reads
    `num_batches_tracked` as a Python float in every training step, which torch.compile
    cannot trace, so a compiled training step would break its graph at every BatchNorm."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = None
    module.train()
    try:
        with torch.no_grad():
            yield module
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum
        module.eval()
