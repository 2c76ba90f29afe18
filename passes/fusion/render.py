"""Draw a fusion plan as a self-contained SVG: kernels as boxes, edges labelled with why they were
not fused. Layered top to bottom in dependence order (longest-path layers of the contracted
graph); no external tool (graphviz) needed.

What a reader sees: one box per fused kernel (its kind, thread mapping, op mix, estimated time
and bytes), grey boxes for library calls (mm, conv) and the layout ops they absorb, and an arrow
for every dependence between them. An arrow between two kernels carries the reason the planner
kept them apart (cycle, resource, cost, policy).
"""

from __future__ import annotations

from html import escape

from passes.fusion.graph import FUSIBLE

COLORS = {"stitch": "#f6c28b", "reduce": "#f9e79f", "loop": "#aed6f1", "gather": "#a9dfbf",
          "scatter": "#d7bde2", "view": "#eeeeee", "library": "#d5d8dc"}
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 230, 62, 40, 56, 20
RIGHT_MARGIN = 260  # room for the long edges that bow out to the right


def _short(name: str) -> str:
    return name.removeprefix("st.")


def _units(plan):
    g = plan.graph
    owner = plan.group_of()
    unit_of = {}
    units: dict[tuple, dict] = {}
    for i in range(g.n):
        if g.role[i] == FUSIBLE:
            k = owner[i]
            key = ("g", k)
            info = plan.groups[k]
            if key not in units:
                # The ops that compute (not reshapes / broadcasts), in program order.
                names: list[str] = []
                for j in sorted(info.members):
                    n = _short(g.ops[j].name)
                    if n not in ("reshape", "broadcast") and n not in names:
                        names.append(n)
                ops = f"{len(info.members)} ops: " + " ".join(names)
                units[key] = {
                    "kind": info.kind,
                    "title": f"kernel {k}: {info.kind}" if info.kernels else f"view {k}",
                    "line2": ops,
                    "line3": (f"{info.seconds * 1e6:.1f} us, {info.desc.traffic / 1e3:.0f} kB"
                              + (", regional->global" if info.demoted else "")),
                    "first": min(info.members),
                }
        else:
            key = ("op", i)
            op = g.ops[i]
            what = "layout absorbed by library" if g.role[i] != "library" else "library call"
            units[key] = {"kind": "library", "title": _short(op.name),
                          "line2": what, "line3": str(op.results[0].type) if op.results else "",
                          "first": i}
        unit_of[i] = key
    # Layout glue and views carry no kernel: draw them inside the unit that consumes them.
    for i in reversed(range(g.n)):
        key = unit_of[i]
        light = g.role[i] == "glue" or (key[0] == "g" and plan.groups[key[1]].is_view)
        if light and g.succs[i]:
            unit_of[i] = unit_of[g.succs[i][0]]
    used = set(unit_of.values())
    units = {k: u for k, u in units.items() if k in used}
    return units, unit_of


def render_svg(plan, title: str = "") -> str:
    g = plan.graph
    units, unit_of = _units(plan)
    edges: dict[tuple, str] = {}
    for u in range(g.n):
        for v in g.succs[u]:
            a, b = unit_of[u], unit_of[v]
            if a != b:
                edges.setdefault((a, b), "")
    owner = plan.group_of()

    def in_kernel(i: int) -> bool:
        return i in owner and plan.groups[owner[i]].kernels > 0

    for r in plan.reasons:  # label edges between two real kernels only
        a, b = unit_of[r.src], unit_of[r.dst]
        if a != b and in_kernel(r.src) and in_kernel(r.dst) and r.reason != "library":
            edges[(a, b)] = r.reason
    # Longest-path layering over the contracted graph, in topological order.
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(units)
    dag.add_edges_from(edges)
    order = list(nx.lexicographical_topological_sort(dag, key=lambda k: units[k]["first"]))
    layer: dict[tuple, int] = {}
    for k in order:
        layer[k] = 1 + max((layer[p] for p in dag.predecessors(k)), default=-1)
    rows: dict[int, list] = {}
    for k in order:
        rows.setdefault(layer[k], []).append(k)
    width = max(len(r) for r in rows.values()) if rows else 1
    pos = {}
    for y, ks in rows.items():
        offset = (width - len(ks)) * (BOX_W + GAP_X) / 2
        for x, k in enumerate(ks):
            pos[k] = (MARGIN + offset + x * (BOX_W + GAP_X), MARGIN + 40 + y * (BOX_H + GAP_Y))
    W = MARGIN * 2 + width * (BOX_W + GAP_X) + RIGHT_MARGIN
    H = MARGIN * 2 + 40 + (len(rows)) * (BOX_H + GAP_Y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" '
           f'font-family="sans-serif" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
           '</defs>',
           f'<text x="{MARGIN}" y="{MARGIN + 12}" font-size="14" font-weight="bold">'
           f'{escape(title or "fusion plan")}: {plan.kernels_before} -> {plan.kernels} '
           f'memory-intensive kernels, {plan.bytes_before / 1e6:.1f} -> {plan.bytes / 1e6:.1f} MB'
           f' ({plan.planner}, {plan.target})</text>']
    taken: set[tuple[int, int]] = set()
    for (a, b), reason in edges.items():
        x1, y1 = pos[a][0] + BOX_W / 2, pos[a][1] + BOX_H
        x2, y2 = pos[b][0] + BOX_W / 2, pos[b][1]
        color = "#c0392b" if reason else "#888"
        span = layer[b] - layer[a]
        if span <= 1:
            out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                       f'stroke="{color}" stroke-width="1.2" marker-end="url(#arrow)"/>')
            lx, ly = (x1 + x2) / 2 + 4, (y1 + y2) / 2
        else:
            # Long edges bow out to the right of the boxes they pass, so they stay visible.
            bow = BOX_W / 2 + 30 + 12 * (span % 5)
            out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1 + bow:.0f},{y1 + 40:.0f} '
                       f'{x2 + bow:.0f},{y2 - 40:.0f} {x2:.0f},{y2:.0f}" fill="none" '
                       f'stroke="{color}" stroke-width="1.2" marker-end="url(#arrow)"/>')
            lx, ly = x1 + bow * 0.75 + 4, y1 + 40
        if reason:
            while (round(lx), round(ly)) in taken:  # stagger labels that would overlap
                ly += 13
            taken.add((round(lx), round(ly)))
            out.append(f'<text x="{lx:.0f}" y="{ly:.0f}" fill="#c0392b">'
                       f'not fused: {escape(reason)}</text>')
    for k, (x, y) in pos.items():
        u = units[k]
        fill = COLORS.get(u["kind"], "#ffffff")
        out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="8" '
                   f'fill="{fill}" stroke="#444"/>')
        for j, (text, weight) in enumerate(((u["title"], "bold"), (u["line2"], "normal"),
                                            (u["line3"], "normal"))):
            out.append(f'<text x="{x + 8:.0f}" y="{y + 17 + 17 * j:.0f}" font-weight="{weight}">'
                       f'{escape(text[:40])}</text>')
    legend_y = H - 14
    lx = MARGIN
    for kind, color in COLORS.items():
        out.append(f'<rect x="{lx}" y="{legend_y - 10}" width="12" height="12" fill="{color}" '
                   'stroke="#444"/>')
        out.append(f'<text x="{lx + 16}" y="{legend_y}">{kind}</text>')
        lx += 90
    out.append("</svg>")
    return "\n".join(out) + "\n"
