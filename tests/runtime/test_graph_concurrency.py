"""One compiled graph called from several threads at once: every call gets its own correct result.

Serving code calls a model from a thread pool. A call writes its intermediates into an arena
and may reuse the outputs it handed back last time; two calls in flight must never share those
(``runtime.graph.CallState``).
"""

import threading

import torch
from torch import nn

from runtime.graph import compile_program
from stitch_ir.importer import import_model


class Block(nn.Module):
    """mm -> GELU -> mm -> softmax: library calls and fused kernels with arena intermediates."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(96, 40)

    def forward(self, x):
        return torch.softmax(self.b(torch.nn.functional.gelu(self.a(x))) * 3.0, dim=-1)


def test_concurrent_calls_each_get_their_own_result():
    torch.manual_seed(0)
    model = Block().eval()
    example = torch.randn(64, 48)
    g = compile_program(import_model(model, (example,)))
    assert g.kernels >= 1 and g.arena_bytes > 0
    n_threads, rounds = 4, 30
    inputs = [[torch.randn(64, 48) * (1 + t) for _ in range(rounds)] for t in range(n_threads)]
    with torch.no_grad():
        want = [[model(x) for x in xs] for xs in inputs]
    errors: list[float] = [0.0] * n_threads
    start = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        start.wait()
        for x, w in zip(inputs[t], want[t]):
            (y,) = g(x)
            errors[t] = max(errors[t], (y - w).abs().max().item())

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert max(errors) < 1e-5, errors
    # concurrent calls made their own states; one state per call in flight at most
    assert 1 <= g.call_states <= n_threads


def test_sequential_calls_reuse_one_state():
    model = Block().eval()
    x = torch.randn(64, 48)
    g = compile_program(import_model(model, (x,)))
    for _ in range(5):
        g(x)
    assert g.call_states == 1
