"""The plot next to docs/benchmarks.md: output tok/s and TTFT p50 against concurrency, one line per system."""

from __future__ import annotations

from pathlib import Path

from report import SystemResult

Series = dict[str, tuple[list[int], list[float], list[float | None]]]


def series(results: list[SystemResult]) -> Series:
    """Per system with levels: (concurrency levels, output tok/s, TTFT p50 ms or None), sorted by concurrency."""
    found: Series = {}
    for result in results:
        levels = sorted(result.levels, key=lambda level: level["concurrency"])
        if levels:
            found[result.system] = (
                [level["concurrency"] for level in levels],
                [level["output_tok_per_s"] for level in levels],
                [level.get("ttft_p50_ms") for level in levels],
            )
    return found


def plot_levels(results: list[SystemResult], path: Path, title: str) -> bool:
    """Write the two-panel PNG to ``path``; False (and no file) when there is nothing to plot."""
    data = series(results)
    if not data:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (tokens_ax, ttft_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for system, (levels, tok_s, ttft) in data.items():
        tokens_ax.plot(levels, tok_s, marker="o", label=system)
        points = [(c, t) for c, t in zip(levels, ttft) if t is not None]  # offline has no TTFT
        if points:
            ttft_ax.plot(*zip(*points), marker="o", label=system)
    for ax, label in ((tokens_ax, "output tok/s (higher is better)"), (ttft_ax, "TTFT p50, ms (lower is better)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({c for levels, _, _ in data.values() for c in levels})
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
