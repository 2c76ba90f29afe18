"""Writes the client benchmark's results: ``clients.json`` (everything, samples included),
``clients.md`` (the table, geometric means, errors, profiles) and two log-scale charts.

Speed-ups count only where the contender is correct: a WRONG or failed case shows its status in
the table and is left out of every geometric mean and chart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _ms(r: dict, k: str) -> str:
    t = r.get("time", {}).get(k)
    if t is not None and k not in r["status"]:  # an extra timing (stitch@1thr)
        return f"{t['median_ms']:.3g} ±{t['iqr_ms']:.2g} ({t.get('mean_ms', math.nan):.3g})"
    if t is None:
        return r["status"].get(k, "-") if r["status"].get(k) != "OK" else "-"
    cell = f"{t['median_ms']:.3g} ±{t['iqr_ms']:.2g} ({t.get('mean_ms', math.nan):.3g})"
    return cell if r["status"].get(k) == "OK" else f"{cell} {r['status'][k]}"


def _x(r: dict, key: str, needs: tuple[str, ...]) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    if any(r["status"].get(k) != "OK" for k in needs):
        return f"({v:.2f})"  # measured, but not a valid comparison
    return f"{v:.2f}"


def _compile(r: dict, k: str) -> str:
    c = r.get("compile_s", {}).get(k)
    if not c:
        return "-"
    return f"{c.get('cold', math.nan):.1f} / {c.get('warm', math.nan):.1f}"


def _steps(r: dict) -> str:
    s = r.get("stitch_steps")
    if s is None:
        return "-"
    order = ("kernel", "copy kernel", "library", "torch", "interpreter", "view", "constant")
    short = {"kernel": "k", "copy kernel": "copy-k", "library": "lib", "torch": "torch",
             "interpreter": "interp", "view": "view", "constant": "const"}
    return " ".join(f"{s[k]}{short[k]}" for k in order if s.get(k))


def valid(r: dict, key: str) -> bool:
    needs = {"stitch_vs_eager": ("stitch",), "inductor_vs_eager": ("inductor",),
             "stitch_vs_inductor": ("stitch", "inductor")}[key]
    return r.get(key) is not None and all(r["status"].get(k) == "OK" for k in needs)


def geomean(rs: list[dict], key: str) -> tuple[float, int]:
    xs = [r[key] for r in rs if valid(r, key)]
    if not xs:
        return math.nan, 0
    return math.exp(sum(math.log(x) for x in xs) / len(xs)), len(xs)


def markdown(env: dict, results: list[dict]) -> str:
    lines = [
        "# Client benchmark: eager / inductor / stitch",
        "",
        f"`{env.get('command', 'python -m bench.clients')}` — {env['date']}, torch "
        f"{env['torch']}, {env['threads']} thread(s) on {env['cpus']} cpu(s), load average at start "
        f"{', '.join(f'{x:.1f}' for x in env['load_avg'])}, {env['repeat']} alternating rounds, "
        f"wall {env.get('wall_s', 0):.0f} s.",
        "",
        "Times: steady-state ms per call (inference) or per training step: the median call ± the "
        "inter-quartile range (the mean call, stalls included, in parentheses). Speed-ups: eager / "
        "contender and inductor / stitch, from the medians (above 1: the second-named is faster); in "
        "parentheses where a contender is WRONG or FAIL (not a valid comparison). "
        "Compile: first call cold / warm, seconds. Stitch steps per call: k = fused kernels (of which "
        "copy-k only move data: slices, permutes, casts), lib = library calls (mm, conv), torch = aten "
        "ops run by torch, interp = groups run by the numpy interpreter, view = torch views made per "
        "call.",
        "",
        "| case | eager ms | inductor ms | stitch ms | ind/eager | stitch/eager | stitch/ind | "
        "err stitch (bound) | compile ind | compile stitch | ind kernels | stitch steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    serial = any("stitch@1thr" in r.get("time", {}) for r in results)
    if serial:
        lines[-2] = lines[-2][:-1] + " stitch@1thr ms |"
        lines[-1] += "---|"
    for r in results:
        err = r.get("error", {}).get("stitch")
        err_s = "-" if err is None else f"{err:.1e} ({r.get('bound', math.nan):.0e})"
        lines.append(
            f"| {r['case']} | {_ms(r, 'eager')} | {_ms(r, 'inductor')} | {_ms(r, 'stitch')} | "
            f"{_x(r, 'inductor_vs_eager', ('inductor',))} | {_x(r, 'stitch_vs_eager', ('stitch',))} | "
            f"{_x(r, 'stitch_vs_inductor', ('stitch', 'inductor'))} | {err_s} | {_compile(r, 'inductor')} "
            f"| {_compile(r, 'stitch')} | {r.get('inductor_kernels', '-')} | {_steps(r)} |"
            + (f" {_ms(r, 'stitch@1thr')} |" if serial else ""))
    lines += ["", "## Geometric means (valid comparisons only)", "",
              "| family | n | inductor / eager | stitch / eager | stitch / inductor |",
              "|---|---|---|---|---|"]
    fams = ["all"] + sorted({r["family"] for r in results})
    for fam in fams:
        rs = results if fam == "all" else [r for r in results if r["family"] == fam]
        cells = []
        for key in ("inductor_vs_eager", "stitch_vs_eager", "stitch_vs_inductor"):
            g, n = geomean(rs, key)
            cells.append(f"{g:.2f}x (n={n})" if n else "-")
        lines.append(f"| {fam} | {len(rs)} | " + " | ".join(cells) + " |")
    bad = [r for r in results if r["errors"] or "WRONG" in r["status"].values()]
    if bad:
        lines += ["", "## Failures and wrong results", ""]
        for r in bad:
            for k, v in r["status"].items():
                if v == "WRONG":
                    lines.append(f"- `{r['case']}` {k}: WRONG, relative error "
                                 f"{r['error'][k]:.2e} > bound {r['bound']:.1e}")
            for k, msg in r["errors"].items():
                lines.append(f"- `{r['case']}` {k}: {msg}")
    fb = [r for r in results if r.get("fallbacks")]
    if fb:
        lines += ["", "## Stitch fallbacks (ops run by torch, groups run by the interpreter)", ""]
        for r in fb:
            lines.append(f"- `{r['case']}`: " + ", ".join(f"{k} x{v}" for k, v in r["fallbacks"].items()))
    prof = [r for r in results if r.get("profile")]
    if prof:
        lines += ["", "## Where stitch's time goes (ms per call, `--profile`)", "",
                  "| case | call | outside graphs (dynamo/AOT) | graph Python | kernel | library | "
                  "torch | interpreter | view | graph inputs | "
                  "slowest steps (inputs) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in prof:
            p = r["profile"]
            k = p["by_kind_ms"]
            top = "; ".join(f"{n.split(' ', 1)[1]} ({shp}) {ms:.3f}" for n, ms, shp in p["top_steps_ms"][:3])
            lines.append(f"| {r['case']} | {p['call_ms']:.3f} | {p['outside_graphs_ms']:.3f} | "
                         f"{p['graph_python_ms']:.3f} | " + " | ".join(
                             f"{k.get(x, 0):.3f}" for x in ("kernel", "library", "torch",
                                                              "interpreter", "view"))
                         + f" | {p.get('inputs', '-')} | {top} |")
    return "\n".join(lines) + "\n"


def charts(out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    rs = [r for r in results if r.get("time")]
    if not rs:
        return
    names = [r["case"] for r in rs]
    width = max(8.0, 0.28 * len(rs) + 2)

    def bars(fname, series, title, ylabel):
        fig, ax = plt.subplots(figsize=(width, 5))
        n = len(series)
        for j, (label, key, color) in enumerate(series):
            xs = [i + (j - (n - 1) / 2) * 0.8 / n for i in range(len(rs))]
            ys = [r[key] if valid(r, key) else math.nan for r in rs]
            ax.bar(xs, ys, width=0.8 / n, label=label, color=color)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)

    bars("clients_vs_eager.png", [("inductor", "inductor_vs_eager", "tab:blue"),
                                  ("stitch", "stitch_vs_eager", "tab:orange")],
         "speed-up over eager (log scale; missing bar = failed or wrong)", "eager time / time")
    bars("clients_vs_inductor.png", [("stitch", "stitch_vs_inductor", "tab:orange")],
         "stitch speed-up over inductor (log scale)", "inductor time / stitch time")


def write_all(out: Path, env: dict, results: list[dict]) -> None:
    (out / "clients.json").write_text(json.dumps({"environment": env, "results": results}, indent=1,
                                                 default=str))
    (out / "clients.md").write_text(markdown(env, results))
    try:
        charts(out, results)
    except Exception as e:  # noqa: BLE001 - a chart is not worth losing the results for
        print(f"# charts not written: {e}")
