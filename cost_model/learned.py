"""The learned cost model: gradient-boosted trees over a fused kernel's features, trained on
measured records (``cost_model.records``) and evaluated without the library that trained them.

Why trees (LightGBM) and not an MLP: the records number in the low thousands, the features are
heterogeneous counts and sizes spanning six orders of magnitude, and what matters is where a
kernel's time departs from the analytic model's (a branchy gather, a transposed read, a scalar
loop GCC did not vectorise): piecewise rules that trees find from few samples. The model
predicts ``log(measured / analytic)``, so where the features leave the trained range the
prediction falls back towards the analytic estimate instead of extrapolating a constant (trees
predict a constant outside their data; the analytic model carries size). A trained model is
saved as JSON (its trees as arrays) and evaluated here by generated Python code (one nested
conditional expression per tree), so planning needs neither LightGBM nor numpy arrays per call:
about 20-40 us per group, next to ~80 us for ``describe`` itself.

Files: a model records the record schema version and the device fingerprint it was trained
for, the thread count its records were timed at, and its held-out evaluation; ``resolve`` loads
the user's model (``stitchc tune --train``) or the one shipped in ``cost_model/data``, and falls
back to the analytic model -- saying why -- when the fingerprint does not match this machine.

Invariants: imports only the standard library (lightgbm and numpy only inside ``train``);
predictions are deterministic and positive; ``features`` of a group is a pure function of its
``KernelDesc``, its IR-level features and the device spec at the record's thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from cost_model.cpu import cpu_schedule
from cost_model.devices import DeviceSpec
from cost_model.kernel import KernelDesc
from cost_model.records import SCHEMA_VERSION

FORMAT = "stitch-learned-gbdt"
FORMAT_VERSION = 1
DATA_DIR = Path(__file__).parent / "data"
MAPPINGS = ("cpu_elementwise", "cpu_rows", "cpu_split", "cpu_columns")
ELEMENT_KINDS = ("el_cheap", "el_div", "el_int", "el_round", "el_exp", "el_log", "el_erf",
                 "el_sqrt", "el_pow", "el_trig", "el_cast", "el_rand", "el_bool", "el_broadcast",
                 "el_permute", "el_slice", "el_reshape", "el_reduce", "el_gather", "el_scatter",
                 "el_permute_rows")
IR_FEATURES = ("elementwise", "broadcast", "reduce", "layout", "gather", "scatter", "cast",
               "compare_select", "permute", "slice_cat_pad", "arg_reduce", "rand", "half_ops",
               "row_reduce", "column_reduce", "all_reduce", "bool_ops", "max_elems", "min_elems",
               "inputs", "outputs", "scratch_bytes", "rows_fit", "regional_values", "demoted",
               "inner_len", "inner_len_min", "loop_shapes", "strided_reduce",
               "reduce_stride", "outer_iters") + ELEMENT_KINDS
KERNEL_FEATURES = ("bytes_read", "bytes_written", "traffic", "flops", "transcendentals",
                   "parallel_size", "row_buffer_bytes", "num_regional", "num_global", "num_ops",
                   "elem_bytes", "reductions", "dom_kind", "dom_rows", "dom_length",
                   "intensity", "trans_per_elem", "bytes_per_elem")
SCHEDULE_FEATURES = ("mapping", "tasks", "split", "team", "waves", "extra_bytes",
                     "memory_log_s", "compute_log_s", "analytic_log_s", "threads")
# What the analytic model leaves out, per nanosecond it predicts: the target is a ratio to the
# analytic estimate, so the work it does not see enters as a ratio to it too (log2(1 + x / ns)).
DENSITY = ("el_cheap", "el_div", "el_int", "el_round", "el_exp", "el_broadcast", "el_permute",
           "el_permute_rows",
           "el_slice", "el_reduce", "el_gather", "el_scatter", "strided_reduce", "outer_iters",
           "dom_rows", "max_elems")
DENSITY_FEATURES = tuple(f"{k}_per_ns" for k in DENSITY)
FEATURES = IR_FEATURES + KERNEL_FEATURES + SCHEDULE_FEATURES + DENSITY_FEATURES
# sizes and counts of elements enter as log2(1 + x): one scale from bytes to gigabytes
_LOGGED = {"max_elems", "min_elems", "scratch_bytes", "bytes_read", "bytes_written", "traffic",
           "flops", "transcendentals", "parallel_size", "row_buffer_bytes", "dom_rows",
           "dom_length", "tasks", "extra_bytes", "inner_len", "inner_len_min", "strided_reduce",
           "reduce_stride", "outer_iters", *ELEMENT_KINDS, *DENSITY_FEATURES}


def _log2(x: float) -> float:
    return math.log2(1.0 + max(0.0, x))


def _log_s(seconds: float) -> float:
    """Seconds as log10 of nanoseconds (a kernel of 1 us is 3.0)."""
    return math.log10(max(seconds, 1e-10) * 1e9)


@lru_cache(maxsize=32)
def at_threads(spec: DeviceSpec, threads: int) -> DeviceSpec:
    """``spec`` as if only ``threads`` cores existed (the record's thread count): bandwidth from
    the table of that many threads, compute rates scaled."""
    if spec.is_gpu or threads >= spec.cores or threads < 1:
        return spec
    scale = threads / spec.cores
    bw = spec.copy_bw_1 if threads == 1 else spec.copy_bw_all
    return replace(spec, cores=threads, copy_bw_all=bw, fp32_flops=spec.fp32_flops * scale,
                   transcendental_rate=spec.transcendental_rate * scale,
                   mem_bandwidth=bw[-1][1] if bw else spec.mem_bandwidth)


def features(ir: dict[str, float], desc: KernelDesc, spec: DeviceSpec,
             threads: int) -> dict[str, float]:
    """The feature dict of one kernel (``FEATURES``; raw values, see ``vector``), with the analytic
    schedule at ``threads`` threads. Also returns the analytic estimate as ``analytic_s``."""
    s = cpu_schedule(desc, at_threads(spec, threads))
    dom = desc.dominant_reduce
    elems = max(ir.get("max_elems", 1.0), 1.0)
    f = dict(ir)
    f.update(bytes_read=desc.bytes_read, bytes_written=desc.bytes_written, traffic=desc.traffic,
             flops=desc.flops, transcendentals=desc.transcendentals,
             parallel_size=desc.parallel_size, row_buffer_bytes=desc.smem_bytes_per_row,
             num_regional=desc.num_regional, num_global=desc.num_global, num_ops=desc.num_ops,
             elem_bytes=desc.elem_bytes, reductions=len(desc.reduce),
             dom_kind=0 if dom is None else 1 + ("row", "column", "all").index(dom.kind),
             dom_rows=0 if dom is None else dom.rows, dom_length=0 if dom is None else dom.length,
             intensity=desc.flops / max(desc.traffic, 1),
             trans_per_elem=desc.transcendentals / elems, bytes_per_elem=desc.traffic / elems,
             mapping=MAPPINGS.index(s.mapping) if s.mapping in MAPPINGS else -1,
             tasks=s.blocks, split=s.split, team=s.team, waves=s.waves,
             extra_bytes=s.extra_bytes, memory_log_s=_log_s(s.memory_seconds),
             compute_log_s=_log_s(s.compute_seconds), analytic_log_s=_log_s(s.seconds),
             threads=threads, analytic_s=s.seconds, memory_s=s.memory_seconds,
             compute_s=s.compute_seconds)
    ns = max(s.seconds * 1e9, 1e-3)
    for k, name in zip(DENSITY, DENSITY_FEATURES):
        f[name] = f[k] / ns
    return f


_IS_LOGGED = tuple(k in _LOGGED for k in FEATURES)


def vector(f: dict[str, float]) -> list[float]:
    """The trees' input row: ``FEATURES`` in order, sizes log-scaled."""
    log2 = math.log2
    return [log2(1.0 + f[k]) if lg else float(f[k]) for k, lg in zip(FEATURES, _IS_LOGGED)]


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class LearnedModel:
    """A trained model: trees over ``vector(features)`` predicting log(measured / analytic)."""

    trees: list[dict]  # LightGBM's tree structure, reduced: see _tree_expr
    fingerprint: str
    target: str = "cpu"
    threads: int = 1
    feature_names: tuple[str, ...] = FEATURES
    schema_version: int = SCHEMA_VERSION
    records: int = 0
    evaluation: dict = field(default_factory=dict)
    default: bool = False  # the planner's default on matching machines (it won held-out)
    # What a compiled graph pays per kernel step beyond the kernel timed alone (Python dispatch,
    # argument patching): measured when the model is trained, added by ``seconds``.
    step_seconds: float = 0.0
    path: str = ""
    _fn: object = None

    name = "learned"

    @property
    def digest(self) -> str:
        """A short hash of the model's content (part of the plan cache key)."""
        text = json.dumps([self.trees, self.fingerprint, self.threads, self.step_seconds,
                           list(self.feature_names)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def log_ratio(self, row: list[float]) -> float:
        if self._fn is None:
            self._fn = _compile(self.trees)
        return self._fn(row)

    def predict(self, f: dict[str, float]) -> float:
        """Predicted seconds of a kernel with features ``f`` (from ``features``)."""
        return f["analytic_s"] * math.exp(self.log_ratio(vector(f)))

    def seconds(self, ir: dict[str, float], desc: KernelDesc, spec: DeviceSpec) -> float:
        """What the planner minimises: the kernel's predicted time plus a graph step's."""
        return self.predict(features(ir, desc, spec, self.threads)) + self.step_seconds

    # -- files ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "schema_version": self.schema_version, "fingerprint": self.fingerprint,
                "target": self.target, "threads": self.threads,
                "features": list(self.feature_names), "records": self.records,
                "step_seconds": self.step_seconds,
                "default": self.default, "evaluation": self.evaluation, "trees": self.trees}

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike[str]) -> LearnedModel:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file")
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"{path}: trained on other features than this stitch computes")
        return LearnedModel(trees=data["trees"], fingerprint=data["fingerprint"],
                            target=data["target"], threads=int(data["threads"]),
                            schema_version=int(data["schema_version"]),
                            records=int(data.get("records", 0)),
                            step_seconds=float(data.get("step_seconds", 0.0)),
                            evaluation=data.get("evaluation", {}),
                            default=bool(data.get("default", False)), path=str(path))


def _tree_expr(node: dict) -> str:
    if "leaf" in node:
        return repr(float(node["leaf"]))
    return (f"({_tree_expr(node['left'])} if x[{int(node['f'])}] <= {float(node['t'])!r} "
            f"else {_tree_expr(node['right'])})")


def _compile(trees: list[dict]):
    """One Python function summing every tree's leaf for a row ``x``."""
    body = " +\n    ".join(_tree_expr(t) for t in trees) or "0.0"
    code = f"def _predict(x):\n  return (\n    {body})\n"
    scope: dict = {}
    exec(compile(code, "<stitch learned model>", "exec"), scope)  # noqa: S102 - our own trees
    return scope["_predict"]


def _from_lightgbm(dump: dict) -> list[dict]:
    """LightGBM's ``dump_model()`` trees as {f, t, left, right} / {leaf} nodes."""
    def walk(n: dict) -> dict:
        if "leaf_value" in n:
            return {"leaf": n["leaf_value"]}
        if n.get("decision_type", "<=") != "<=":
            raise ValueError(f"unsupported split {n.get('decision_type')}")
        return {"f": n["split_feature"], "t": n["threshold"], "left": walk(n["left_child"]),
                "right": walk(n["right_child"])}

    return [walk(t["tree_structure"]) for t in dump["tree_info"]]


# Chosen by leave-one-workload-out validation on this machine's records (runtime.tune_eval):
# 100 trees of 15 leaves ranked held-out workloads as well as 300 of 31 (mean tau 0.78) and cost
# a sixth to evaluate (~15 us a group, where 300 x 31 took ~100 us and doubled planning time).
PARAMS = {"objective": "huber", "alpha": 0.5, "learning_rate": 0.1, "num_leaves": 15,
          "min_data_in_leaf": 10, "feature_fraction": 0.8, "bagging_fraction": 0.8,
          "bagging_freq": 1, "lambda_l2": 1.0, "verbose": -1, "seed": 0,
          "deterministic": True, "num_threads": 1}
ROUNDS = 100


def train(rows: list[dict[str, float]], measured: list[float], fingerprint: str,
          threads: int, target: str = "cpu", params: dict | None = None,
          rounds: int = ROUNDS) -> LearnedModel:
    """Fit trees to ``log(measured / analytic)`` of feature dicts ``rows`` (needs lightgbm)."""
    import lightgbm as lgb
    import numpy as np

    if not rows:
        raise ValueError("no records to train on")
    x = np.array([vector(f) for f in rows], dtype=np.float64)
    y = np.array([math.log(m / f["analytic_s"]) for f, m in zip(rows, measured)])
    p = {**PARAMS, **(params or {})}
    booster = lgb.train(p, lgb.Dataset(x, y, feature_name=list(FEATURES),
                                       params={"verbose": -1}), num_boost_round=rounds)
    return LearnedModel(_from_lightgbm(booster.dump_model()), fingerprint, target, threads,
                        records=len(rows))


# ----------------------------------------------------------------------------------------------
# Which model the planner uses


def user_model_path(fingerprint: str, target: str = "cpu") -> Path:
    """Where ``stitchc tune --train`` saves a model for this machine."""
    root = os.environ.get("STITCH_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "stitch"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return base / "learned" / f"{target}-{digest}.json"


def shipped_model_path(target: str = "cpu") -> Path:
    return DATA_DIR / f"{target}_learned.json"


@dataclass(frozen=True)
class Choice:
    """The cost model the planner will use, and why."""

    name: str  # analytic | learned
    model: LearnedModel | None
    note: str


_loaded: dict[tuple[str, float], LearnedModel] = {}


def _load_cached(path: Path) -> LearnedModel:
    key = (str(path), path.stat().st_mtime)
    if key not in _loaded:
        _loaded[key] = LearnedModel.load(path)
    return _loaded[key]


def resolve(request: str, spec: DeviceSpec) -> Choice:
    """The cost model for ``request`` (analytic | learned | auto) on ``spec``.

    ``learned`` and ``auto`` look for ``$STITCH_COST_MODEL`` (a model file), then the user's
    model for this machine, then the shipped one, and take the first whose fingerprint is
    ``spec.fingerprint`` (a fixed, unmeasured spec has none: analytic). ``auto`` takes it only
    where its held-out evaluation made it the default; ``learned`` takes it whenever it fits."""
    if request not in ("analytic", "learned", "auto"):
        raise ValueError(f"unknown cost model {request!r} (analytic | learned | auto)")
    if request == "analytic":
        return Choice("analytic", None, "analytic model requested")
    if spec.is_gpu:
        return Choice("analytic", None, f"no learned model for {spec.name}: analytic")
    if not spec.fingerprint:
        return Choice("analytic", None, "fixed device spec (no fingerprint): analytic")
    paths = [Path(p) for p in [os.environ.get("STITCH_COST_MODEL", "")] if p]
    paths += [user_model_path(spec.fingerprint, spec.name), shipped_model_path(spec.name)]
    seen = []
    for path in paths:
        if not path.exists():
            continue
        try:
            model = _load_cached(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            seen.append(f"{path}: unreadable ({e})")
            continue
        if model.fingerprint != spec.fingerprint:
            seen.append(f"{path.name} is for '{model.fingerprint}'")
            continue
        if request == "auto" and not model.default:
            return Choice("analytic", None, f"learned model {path.name} did not win its held-out "
                          "evaluation: analytic")
        return Choice("learned", model, f"learned model {path} ({model.records} records)")
    why = "; ".join(seen) or "no learned model found"
    return Choice("analytic", None, f"no learned model for this machine "
                  f"('{spec.fingerprint}'): {why}; falling back to the analytic model")
