"""``stitchc tune``: build and time the planner's candidate groups, and keep the records.

For each workload (a registered model, or ``pattern:NAME[/SCALE]`` from ``bench.patterns``):

1. import it and run the passes before planning; run the reference interpreter once on its
   example inputs, so every candidate kernel is timed on the values it really reads (a gather's
   indices in range, a mask as sparse as the model's);
2. choose candidates the way the planner sees them: the groups of the stitch plan (and of the
   learned model's plan when one exists), of the greedy plan, a sample of the planner's own
   candidate pool stratified by size, and for sampled groups the alternatives a planner weighs
   against them (the group split in two in program order, its single ops): so "which of these
   is fastest" can be asked of the records;
3. outline each candidate into a stand-alone ``fusion.group``, schedule it (``stitch-schedule``),
   render it (``codegen.cpp``), build a batch of them as one or two translation units, and time
   each kernel alone on prepacked arguments: the inputs above, outputs and scratch allocated
   once (the steady state of a compiled graph), ``samples`` samples of enough calls to last
   ``MIN_SAMPLE_SECONDS``, the kernels of a batch alternating (A B C .. C B A ..), at
   ``threads`` OpenMP threads; median, minimum and the inter-quartile spread are kept;
4. append a ``Record`` per kernel to the store (``cost_model.records``), one transaction per
   batch: an interrupted run keeps every finished batch and a re-run skips it.

Jobs are batches of one workload's candidates. ``tune(..., cluster=ADDRESS)`` runs them on a
Ray cluster (``runtime.tune_ray``) instead of in this process; the records come back here and
go into the one store.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field

PRE_PASSES = "canonicalize,cse,dce,split-column-variance,canonicalize,cse,sink-broadcasts"
MIN_SAMPLE_SECONDS = 2e-4  # a sample repeats a kernel until it lasts this long
SAMPLES = 21
BATCH = 12  # candidates per job: built together, timed alternating, stored in one transaction
PER_MODEL = 160  # sampled candidates per workload (plans, splits and single ops come on top)
PATTERNS = ("layernorm", "softmax", "bias_gelu", "bias_residual_layernorm", "gnn")
PATTERN_SCALES = (4, 16, 64, 256)  # the patterns' rows / scale: sizes the workloads lack


def workload_names(all_: bool = False, names: str = "") -> list[str]:
    """``--all``: the nine workloads, the cpu pattern set, and the patterns at smaller sizes;
    else the comma-separated names."""
    import models

    if all_:
        return models.names() + [f"pattern:{p}" for p in PATTERNS] + [
            f"pattern:{p}/{s}" for s in PATTERN_SCALES for p in PATTERNS]
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        if not n.startswith("pattern:") and n not in models.names():
            raise ValueError(f"unknown workload {n!r} (one of {', '.join(models.names())}, "
                             f"or pattern:NAME[/SCALE] with NAME in {', '.join(PATTERNS)})")
    return out


def model_and_inputs(name: str):
    """(torch module, example inputs) of a workload or ``pattern:NAME[/SCALE]``."""
    if name.startswith("pattern:"):
        from bench.patterns import Wrap, patterns

        pname, _, scale = name[len("pattern:"):].partition("/")
        fn, inputs = patterns(scale=int(scale) if scale else None)[pname]
        return Wrap(fn).eval(), tuple(inputs)
    import models

    w = models.get(name)
    return w.model, tuple(w.example_inputs)


@dataclass
class TuneWorkload:
    """A workload's function before planning, its planning graph and the values it computes."""

    name: str
    prog: object  # ImportedProgram
    func: object  # FuncOp
    graph: object  # PlanGraph
    inputs: tuple  # the example inputs (torch tensors)
    digest: str  # of the printed function: node ids are positions in it
    values: dict[int, object] | None = None  # id(Value) -> numpy array (``with_values``)


_prepared: dict[str, TuneWorkload] = {}


def prepare(name: str) -> TuneWorkload:
    """Import and run the passes before planning (cached per process); no values yet."""
    if name in _prepared:
        return _prepared[name]
    from passes import PassContext, PassManager
    from passes.fusion.graph import build_graph
    from stitch_ir.importer import import_model
    from stitch_ir.printer import print_op

    model, inputs = model_and_inputs(name)
    prog = import_model(model, inputs)
    PassManager.parse(PRE_PASSES).run(prog.module, PassContext(target="cpu"))
    func = prog.module.func()
    digest = hashlib.sha256(print_op(func).encode()).hexdigest()[:16]
    tw = TuneWorkload(name, prog, func, build_graph(func), tuple(inputs), digest)
    _prepared[name] = tw
    return tw


def with_values(tw: TuneWorkload) -> TuneWorkload:
    """Interpret ``tw`` once and keep the values its fusible ops read. One workload's values
    are kept per process (a full-size pattern's are hundreds of megabytes)."""
    if tw.values is not None:
        return tw
    for other in _prepared.values():
        other.values = None
    import torch

    from passes.fusion.graph import FUSIBLE
    from runtime.graph import _to_numpy
    from stitch_ir.interpreter import IMPLS

    g, func, prog = tw.graph, tw.func, tw.prog
    wanted = {id(v) for i, op in enumerate(g.ops) if g.role[i] == FUSIBLE for v in op.operands}
    last: dict[int, int] = {}  # value -> the last op reading it: dropped after that
    for k, op in enumerate(func.body.ops):
        for v in op.operands:
            last[id(v)] = k
    env: dict[int, object] = {}
    user = dict(zip(prog.user_inputs, tw.inputs))
    for i, a in enumerate(func.args):
        env[id(a)] = _to_numpy(prog.constants[i] if i in prog.constants else user[i])
    values = {k: v for k, v in env.items() if k in wanted}
    with torch.no_grad():
        for k, op in enumerate(func.body.ops[:-1]):
            outs = IMPLS[op.name](op, [env[id(v)] for v in op.operands])
            for r, val in zip(op.results, outs):
                env[id(r)] = val
                if id(r) in wanted:
                    values[id(r)] = val
            for v in op.operands:
                if last.get(id(v)) == k:
                    env.pop(id(v), None)
    tw.values = values
    return tw


# ----------------------------------------------------------------------------------------------
# Which candidates


@dataclass
class Item:
    members: tuple[int, ...]
    origin: list[str] = field(default_factory=list)


def _bits(members) -> int:
    b = 0
    for i in members:
        b |= 1 << i
    return b


def choose_candidates(tw: TuneWorkload, device, per_model: int = PER_MODEL, seed: int = 0,
                      learned=None) -> list[Item]:
    """The candidates of ``tw`` to time (see the module docstring, step 2), plan groups first."""
    from passes.fusion.graph import members_of
    from passes.fusion.plan import CANDIDATES_PER_SECOND, make_plan
    from passes.fusion.planner import Costs, candidates, plan_greedy

    g = tw.graph
    costs = Costs(g, device)
    items: dict[int, Item] = {}

    def add(b: int, why: str) -> None:
        info = costs(b)
        if not info.legal or info.is_view:
            return
        it = items.setdefault(b, Item(tuple(info.members)))
        if why not in it.origin:
            it.origin.append(why)

    plans = [("stitch", make_plan(tw.func, "stitch", device))]
    if learned is not None:
        plans.append(("learned", make_plan(tw.func, "stitch", device, cost_model=learned)))
    for tag, plan in plans:
        for gi in plan.groups:
            add(_bits(gi.members), f"plan:{tag}")
    greedy = plan_greedy(g, costs)
    for b in greedy:
        add(b, "plan:greedy")
    pool = candidates(g, costs, 4, 40, seeds=[greedy], budget=int(CANDIDATES_PER_SECOND * 5))
    rng = random.Random(seed)
    buckets: dict[int, list[int]] = {}
    for b in sorted(pool):
        buckets.setdefault(min(b.bit_count().bit_length(), 5), []).append(b)
    picked: list[int] = []
    share = max(1, per_model // max(1, len(buckets)))
    for k in sorted(buckets):
        bs = buckets[k]
        picked += rng.sample(bs, min(share, len(bs)))
    rest = [b for b in sorted(pool) if b not in set(picked)]
    picked += rng.sample(rest, min(len(rest), max(0, per_model - len(picked))))
    for b in picked:
        add(b, "sample")
    # The alternatives a planner weighs against a sampled group: split in program order (both
    # halves are convex: a prefix of a convex group in topological order), and its single ops.
    for b in picked + [b for _, p in plans for b in map(lambda gi: _bits(gi.members), p.groups)]:
        ms = members_of(b)
        if len(ms) < 2:
            continue
        half = _bits(ms[: len(ms) // 2])
        if costs(half).legal and costs(b & ~half).legal:
            add(half, "split")
            add(b & ~half, "split")
        if len(ms) <= 4:
            for i in ms:
                add(1 << i, "single")
    return list(items.values())


# ----------------------------------------------------------------------------------------------
# Building and timing


def outline(tw: TuneWorkload, members, device, variant: str = ""):
    """A stand-alone, scheduled ``fusion.group`` of ``members`` (the original function is not
    touched: the group reads placeholder arguments)."""
    from passes.fusion.features import describe
    from passes.fusion.graph import is_free_constant
    from passes.stitch_schedule import schedule_group
    from stitch_ir.core import Block
    from stitch_ir.dialects import fusion

    g = tw.graph
    info = describe(g, _bits(members), device)
    placeholder = Block([v.type for v in info.inputs])
    group = fusion.GroupOp.create(list(placeholder.args), [v.type for v in info.outputs],
                                  info.kind, estimated_us=round(info.seconds * 1e6, 3),
                                  bytes_read=info.desc.bytes_read,
                                  bytes_written=info.desc.bytes_written)
    body = group.body
    mapping = {id(v): a for v, a in zip(info.inputs, body.args)}
    for i in sorted(info.members):
        op = g.ops[i]
        operands = []
        for v in op.operands:
            if id(v) not in mapping and is_free_constant(v):
                c = type(v.owner)([], [r.type for r in v.owner.results], dict(v.owner.attributes))
                body.append(c)
                mapping[id(v)] = c.results[0]
            operands.append(mapping[id(v)])
        clone = type(op)(operands, [r.type for r in op.results], dict(op.attributes))
        body.append(clone)
        for r, cr in zip(op.results, clone.results):
            mapping[id(r)] = cr
    body.append(fusion.YieldOp([mapping[id(v)] for v in info.outputs]))
    group.set_attrs(**schedule_group(group, device))
    if variant == "team1":
        group.set_attrs(team=1)
    elif variant:
        raise ValueError(f"unknown schedule variant {variant!r}")
    return group, info


def time_calls(calls: list, samples: int = SAMPLES,
               min_sample: float = MIN_SAMPLE_SECONDS) -> tuple[list[list[float]], list[int]]:
    """Seconds per call of each callable: ``samples`` samples each, every sample repeating the
    call enough times to last ``min_sample``; the callables alternate, in forward then reverse
    order, so a slow spell of the machine hits them all. Returns (samples, calls per sample)."""
    inner = []
    for f in calls:
        f()
        f()
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        inner.append(max(1, min(20000, math.ceil(min_sample / max(dt, 1e-7)))))
    out: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for s in range(samples):
        for k in (order if s % 2 == 0 else order[::-1]):
            f, n = calls[k], inner[k]
            t = time.perf_counter()
            for _ in range(n):
                f()
            out[k].append((time.perf_counter() - t) / n)
    return out, inner


def summarise(ts: list[float]) -> tuple[float, float, float]:
    """(median, minimum, inter-quartile range / median)."""
    s = sorted(ts)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    q1, q3 = s[n // 4], s[(3 * n) // 4]
    return med, s[0], (q3 - q1) / med if med > 0 else 0.0


def measure(tw: TuneWorkload, items: list[Item], device, threads: int = 1, variant: str = "",
            samples: int = SAMPLES, target: str = "cpu"):
    """Build and time ``items`` of ``tw``; returns (records, failures as (item, error))."""
    import torch

    from codegen.cpp.kernel import PRELUDE, render_group
    from codegen.cpp.scalars import Unsupported
    from cost_model.learned import features
    from cost_model.records import Record
    from passes.fusion.features import ir_features
    from runtime.build import build_kernels, load_built
    from runtime.graph import _from_numpy
    from stitch_ir.importer import dtype_to_torch

    failures: list[tuple[Item, str]] = []
    built = []
    for it in items:
        try:
            group, info = outline(tw, it.members, device, variant)
            src = render_group(group, group.kind)
            built.append((it, group, info, src))
        except (Unsupported, ValueError, NotImplementedError, KeyError) as e:
            failures.append((it, f"{type(e).__name__}: {e}"))
    if not built:
        return [], failures
    libs = build_kernels([(s.symbol, s.body) for _, _, _, s in built], PRELUDE)
    keep, calls, ready = [], [], []
    for it, group, info, src in built:
        kern = load_built(libs[src.symbol], src.symbol)
        ins = [_from_numpy(tw.values[id(v)], v).contiguous() for v in info.inputs]
        outs = [torch.empty([int(d) for d in v.type.shape], dtype=dtype_to_torch(v.type.dtype))
                for v in info.outputs]
        scratch = [torch.empty(max(n, 64), dtype=torch.uint8) for n in src.scratch]
        packed = kern.pack(*[t.data_ptr() for t in ins + outs + scratch])
        rc = kern._fn(packed)
        if rc:
            failures.append((it, f"kernel returned {rc}"))
            continue
        keep.append((ins, outs, scratch))
        calls.append(lambda fn=kern._fn, p=packed: fn(p))
        ready.append((it, group, info, src))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # torch's libgomp is the kernels' (one libgomp.so.1)
    try:
        times, inner = time_calls(calls, samples) if calls else ([], [])
    finally:
        torch.set_num_threads(before)
    host = socket.gethostname()
    records = []
    for (it, group, info, src), ts, n in zip(ready, times, inner):
        feats = features(ir_features(tw.graph, info), info.desc, device, threads)
        med, lo, spread = summarise(ts)
        records.append(Record(
            workload=tw.name, target=target, fingerprint=device.fingerprint, threads=threads,
            variant=variant, symbol=src.symbol, members=list(it.members), origin=it.origin,
            kind=group.kind, strategy=src.strategy, mapping=str(group.attr("mapping", "")),
            features=feats, analytic_seconds=feats["analytic_s"], median_seconds=med,
            min_seconds=lo, spread=spread, samples=len(ts), calls=n, host=host))
    del keep
    return records, failures


def step_seconds(threads: int = 1, repeat: int = 15) -> float:
    """What a compiled graph pays per kernel step beyond the kernel itself: two chains of tiny
    element-wise kernels (planner ``none``), 2 and 40 ops long, called back to back; the
    difference per kernel less the kernels' own time alone."""
    import torch

    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    class Chain(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.n = n

        def forward(self, x):
            for i in range(self.n):
                x = x * 1.5 if i % 2 else x + 1.0
            return x

    x = torch.randn(8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_call, kernel_only = [], []
        for n in (2, 40):
            g = compile_program(import_model(Chain(n).eval(), (x,)), fusion="none")
            steps = [s for s in g.steps if s.kind == "kernel"]
            calls = [lambda g=g: g(x)]
            for s in steps:  # each kernel alone on prepacked arguments, as tune times them
                packed = s.kernel.pack(*[x.data_ptr()] * (len(s.reads) + len(s.writes)))
                calls.append(lambda fn=s.kernel._fn, p=packed: fn(p))
            ts, _ = time_calls(calls, repeat)
            per_call.append((len(steps), min(ts[0])))
            kernel_only.append(sum(min(t) for t in ts[1:]))
    finally:
        torch.set_num_threads(before)
    (k1, t1), (k2, t2) = per_call
    return max(0.0, ((t2 - kernel_only[1]) - (t1 - kernel_only[0])) / (k2 - k1))


# ----------------------------------------------------------------------------------------------
# Jobs, progress, the driver


def run_job(job: dict) -> dict:
    """One job (a batch of one workload's candidates): measured here, returned as data. Runs in
    this process or on a Ray worker (``runtime.tune_ray``)."""
    from dataclasses import asdict

    from cost_model import get_device

    marker = os.environ.get("STITCH_TUNE_CRASH_ONCE")  # tests: a worker lost mid-job, once
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    tw = with_values(prepare(job["workload"]))
    if tw.digest != job["digest"]:
        raise RuntimeError(f"{job['workload']}: this worker imports a different function "
                           f"({tw.digest} != {job['digest']}): another stitch or torch version")
    device = get_device("cpu")
    items = [Item(tuple(m), list(o)) for m, o in job["items"]]
    recs, fails = measure(tw, items, device, job["threads"], job["variant"], job["samples"])
    return {"records": [asdict(r) for r in recs],
            "failures": [(list(it.members), err) for it, err in fails],
            "host": socket.gethostname(), "pid": os.getpid()}


class Progress:
    """A progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, total: int, label: str = "tune", stream=None, enabled: bool = True):
        self.total, self.done, self.label = total, 0, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 5 and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        eta_s = "--:--" if math.isinf(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        line = (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"kernels  {rate * 60:.0f}/min  ETA {eta_s}  {note}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def plan_jobs(names: list[str], store, device, threads: int = 1, variant: str = "",
              per_model: int = PER_MODEL, samples: int = SAMPLES, batch: int = BATCH,
              seed: int = 0, learned=None, log=print) -> list[dict]:
    """The jobs still to run: every chosen candidate whose record is not in ``store`` yet."""
    from cost_model.records import record_key

    have = store.keys() | store.failed_keys()
    jobs = []
    for name in names:
        tw = prepare(name)
        items = choose_candidates(tw, device, per_model, seed, learned)
        todo = [it for it in items if record_key(name, list(it.members), threads,
                                                 device.fingerprint, variant) not in have]
        log(f"  {name}: {len(items)} candidates, {len(items) - len(todo)} already measured, "
            f"{len(todo)} to time")
        for k in range(0, len(todo), batch):
            chunk = todo[k:k + batch]
            jobs.append({"workload": name, "digest": tw.digest, "threads": threads,
                         "variant": variant, "samples": samples,
                         "items": [(list(it.members), it.origin) for it in chunk]})
    return jobs


def store_result(store, job: dict, result: dict) -> int:
    from cost_model.records import Record, record_key

    recs = [Record(**r) for r in result["records"]]
    n = store.add(recs)
    fp = recs[0].fingerprint if recs else ""
    for members, err in result["failures"]:
        store.add_failure(record_key(job["workload"], members, job["threads"], fp,
                                     job["variant"]), job["workload"], members, err)
    return n


def tune(names: list[str], store_path, threads: int = 1, variant: str = "",
         per_model: int = PER_MODEL, samples: int = SAMPLES, batch: int = BATCH, seed: int = 0,
         cluster: str | None = None, progress: bool = True, learned: bool = True,
         log=print) -> dict:
    """Time the candidates of ``names`` not yet in the store at ``store_path``; returns counts."""
    from cost_model import get_device
    from cost_model.learned import resolve
    from cost_model.records import RecordStore

    device = get_device("cpu")
    model = resolve("learned", device).model if learned else None
    with RecordStore(store_path) as store:
        log(f"stitchc tune: {len(names)} workload(s) -> {store_path} ({len(store)} records), "
            f"{threads} thread(s), device '{device.fingerprint}'"
            + (", learned plans too" if model is not None else ""))
        jobs = plan_jobs(names, store, device, threads, variant, per_model, samples, batch, seed,
                         model, log)
        total = sum(len(j["items"]) for j in jobs)
        bar = Progress(total, enabled=progress)
        added = failed = 0
        if cluster:
            from runtime.tune_ray import run_on_ray

            for job, result in run_on_ray(cluster, jobs, log=log):
                added += store_result(store, job, result)
                failed += len(result["failures"])
                bar.update(len(job["items"]), job["workload"])
        else:
            for job in jobs:
                result = run_job(job)
                added += store_result(store, job, result)
                failed += len(result["failures"])
                bar.update(len(job["items"]), job["workload"])
        log(f"stitchc tune: {added} new records, {failed} candidates not compiled; "
            f"{len(store)} records in {store_path}")
        return {"jobs": len(jobs), "added": added, "failed": failed, "total": len(store)}


def default_store() -> str:
    root = os.environ.get("STITCH_CACHE_DIR")
    base = root if root else os.path.join(os.path.expanduser("~"), ".cache", "stitch")
    return os.path.join(base, "tune", "records.sqlite")
