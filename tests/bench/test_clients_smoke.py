"""The client benchmark end to end on one tiny case: correctness, compile times, step counts,
alternating timings, and the JSON / markdown / PNG it writes (``bench/clients.py``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import clients  # noqa: E402


def test_one_tiny_case_end_to_end(tmp_path):
    case = "silu_mul/small/f32/infer"
    assert clients.main(["--cases", case, "--repeat", "2", "--sample-ms", "1", "--profile",
                         "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "clients.json").read_text())
    (r,) = data["results"]
    assert r["case"] == case
    assert r["status"] == {"eager": "OK", "inductor": "OK", "stitch": "OK"}, r["errors"]
    assert r["error"]["stitch"] <= r["bound"]
    assert r["stitch_steps"] == {"kernel": 1}
    assert set(r["compile_s"]["stitch"]) == {"cold", "warm"}
    for k in ("eager", "inductor", "stitch"):
        assert len(r["time"][k]["samples_ms"]) == 2 and r["time"][k]["median_ms"] > 0
    assert r["profile"]["by_kind_ms"]["kernel"] > 0 and r["profile"]["top_steps_ms"][0][2] == "8x67 8x67"
    md = (tmp_path / "clients.md").read_text()
    assert case in md and "Geometric means" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra; `make test` has not
        for png in ("clients_vs_eager.png", "clients_vs_inductor.png"):
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_a_wrong_result_is_reported_and_not_counted():
    from bench.client_report import geomean, valid

    r = {"status": {"eager": "OK", "inductor": "OK", "stitch": "WRONG"}, "stitch_vs_inductor": 9.0,
         "stitch_vs_eager": 9.0, "inductor_vs_eager": 2.0}
    assert not valid(r, "stitch_vs_inductor") and valid(r, "inductor_vs_eager")
    assert geomean([r], "stitch_vs_eager")[1] == 0


def test_relative_error_handles_infinities_and_integers():
    import torch

    a = torch.tensor([float("-inf"), 1.0, 2.0])
    assert clients.rel_error([a, torch.arange(3)], [a.clone(), torch.arange(3)]) == 0.0
    assert clients.rel_error([torch.arange(3)], [torch.arange(1, 4)]) == float("inf")
    assert clients.rel_error([a], [torch.tensor([0.0, 1.0, 2.0])]) == float("inf")
