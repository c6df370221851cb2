"""Pictures of a run: the structure over the model's layers and roles, the search curve, the Pareto
front. Matplotlib with the Agg backend (no screen needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petlsearch.searchspace.structure import Placement
    from petlsearch.strategies.base import TrialRecord


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row_label(p: Placement) -> str:
    name, _, kind = p.site.partition(":")
    parts = name.split(".")
    # "encoder.L3.attn.q" -> "encoder attn.q"; the layer becomes the column
    stack = parts[0]
    rest = [x for x in parts[1:] if not (x.startswith("L") and x[1:].isdigit())]
    label = ".".join(rest) or kind
    return f"{stack} {label} ({kind})" if kind not in ("weight",) else f"{stack} {label}"


def structure_heatmap(placements: Sequence[Placement], counts: Sequence[int], path: str | Path,
                      title: str = "", layers: Sequence[int] = ()) -> Path:
    """Trainable parameters per (role, layer): where the search put its budget, over all `layers`."""
    import numpy as np

    plt = _plt()
    rows = sorted({_row_label(p) for p in placements}) or ["(empty)"]
    layers = sorted(set(layers) | {p.layer for p in placements if p.layer is not None})
    cols = [*layers, "other"] if any(p.layer is None for p in placements) else layers or ["other"]
    grid = np.zeros((len(rows), len(cols)))
    labels: dict[tuple[int, int], list[str]] = {}
    for p, n in zip(placements, counts):
        r, c = rows.index(_row_label(p)), cols.index(p.layer if p.layer is not None else "other")
        grid[r, c] += n
        labels.setdefault((r, c), []).append(p.plugin)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.38 * len(rows)))
    im = ax.imshow(np.where(grid > 0, grid, np.nan), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"L{c}" if isinstance(c, int) else c for c in cols])
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (r, c), names in labels.items():
        ax.text(c, r, "\n".join(sorted(set(names))), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, label="trainable parameters")
    ax.set_title(title or "structure: trainable parameters by layer and site", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def search_curve(history: Sequence[TrialRecord], path: str | Path, title: str = "",
                 curve: Sequence[dict[str, Any]] = ()) -> Path:
    """Validation score of each trial and the best so far; with a supernet `curve` (S3PET), its
    training loss and expected budget use over steps (alone when the search had a single trial, whose
    score goes in the title: one point is not a curve)."""
    fig = search_curve_figure(history, title, curve)
    return _save(fig, path)


def search_curve_figure(history: Sequence[TrialRecord], title: str = "",
                        curve: Sequence[dict[str, Any]] = ()) -> Any:
    plt = _plt()
    done = sorted((r for r in history if r.score is not None), key=lambda r: r.number)
    title = title or "search curve"
    if curve and len(done) <= 1:
        fig, ax2 = plt.subplots(figsize=(6, 3.5))
        scores = f": trial {done[0].number} scored {done[0].score:.4f} on validation" if done else ""
        _supernet_panel(ax2, curve, f"{title}{scores}")
        fig.tight_layout()
        return fig
    if curve:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        _supernet_panel(ax2, curve, "supernet")
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    if done:
        xs = [r.number for r in done]
        ys = [r.score for r in done]
        best, run = [], float("-inf")
        for y in ys:
            run = max(run, y)
            best.append(run)
        ax.scatter(xs, ys, s=14, label="trial", c=["tab:gray" if r.status == "pruned" else "tab:blue" for r in done])
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)  # trials are whole numbers
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _supernet_panel(ax: Any, curve: Sequence[dict[str, Any]], title: str) -> None:
    steps = [p["step"] for p in curve]
    ax.plot(steps, [p.get("loss") for p in curve], label="supernet loss", color="tab:blue")
    ax.set_xlabel("supernet step")
    ax.set_ylabel("training loss")
    twin = ax.twinx()
    twin.plot(steps, [p.get("budget_use") for p in curve], label="expected budget use", color="tab:orange")
    twin.set_ylabel("expected budget use")
    ax.set_title(title, fontsize=9)


def _save(fig: Any, path: str | Path) -> Path:
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def pareto_plot(history: Sequence[TrialRecord], front: Sequence[TrialRecord], path: str | Path,
                limit: int | None = None, title: str = "") -> Path:
    """Score vs trainable parameters of every trial, the Pareto front, and the budget."""
    plt = _plt()
    done = [r for r in history if r.score is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([max(r.params, 1) for r in done], [r.score for r in done], s=14, color="tab:gray", label="trials")
    if front:
        ax.plot([max(r.params, 1) for r in front], [r.score for r in front], "o-", color="tab:red", label="Pareto front")
    if limit:
        ax.axvline(limit, color="black", ls="--", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title or "score vs size", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def graph_picture(graph: Any, path: str | Path) -> Path:
    """The model's roled modules as a layered drawing (stack x layer), coloured by role; the layers are
    labelled L0, L1, ... as in structure files and structure.png."""
    return _save(graph_figure(graph), path)


def graph_figure(graph: Any) -> Any:
    import networkx as nx

    plt = _plt()
    nodes = [n for n in graph.nodes.values() if n.role and n.role not in ("block",)]
    g = nx.DiGraph()
    pos, colours = {}, {}
    roles = sorted({n.role for n in nodes})
    cmap = plt.get_cmap("tab20")
    stacks = {s: i for i, s in enumerate(dict.fromkeys(n.stack for n in nodes))}
    for n in nodes:
        g.add_node(n.path)
        layer = n.layer if n.layer is not None else -1  # outside the blocks: left of L0
        pos[n.path] = (layer + 0.15 * stacks[n.stack], -roles.index(n.role) - 0.3 * stacks[n.stack])
        colours[n.path] = cmap(roles.index(n.role) % 20)
    for a, b, d in graph.g.edges(data=True):
        if a in pos and b in pos and d.get("kind") in ("next", "flow"):
            g.add_edge(a, b)
    layers = sorted({n.layer for n in nodes if n.layer is not None})
    width = max(6, 0.6 * (len(layers) + 2))
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(roles) + 1.5))
    nx.draw_networkx(g, pos, ax=ax, node_size=60, with_labels=False,
                     node_color=[colours[n] for n in g.nodes], arrows=False, width=0.3)
    outside = any(n.layer is None for n in nodes)
    ax.set_xticks(([-1] if outside else []) + layers, (["outside"] if outside else []) + [f"L{i}" for i in layers])
    ax.set_yticks([-i for i in range(len(roles))], roles)
    ax.set_xlabel("layer")
    ax.tick_params(left=True, bottom=True, labelleft=True, labelbottom=True)
    ax.set_title(f"{graph.family}: sites by role and layer", fontsize=9)
    fig.tight_layout()
    return fig
