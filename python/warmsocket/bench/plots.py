"""PNG plots of a result file (matplotlib, Agg backend: no display needed).

* `agent_e2e.png`: end-to-end time per mode and size, per profile, with WebSocket
  mode's reduction against HTTP full replay written above its bar (the headline);
* `agent_turn_latency.png`: turn latency by turn index, one line per mode;
* `agent_breakdown.png`: the per-turn split (upload, server, upstream TTFT, decode,
  return, tool) stacked by turn index, one panel per mode, at the largest size;
* `throughput.png`: turns/s and echo round trips/s against connections, and p50/p99.

matplotlib is the optional `bench` extra (`pip install '.[bench]'` in a clone, or
`pip install matplotlib`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODE_COLORS = {
    "websocket": "#1f77b4",
    "http-replay": "#d62728",
    "http-chained": "#2ca02c",
    "agentic-api": "#9467bd",
}
SEGMENT_COLORS = {
    "upload": "#d62728",
    "server": "#ff7f0e",
    "ttft": "#9467bd",
    "decode": "#1f77b4",
    "return": "#17becf",
    "tool": "#7f7f7f",
}
SEGMENT_LABELS = {
    "upload": "upload",
    "server": "server context work",
    "ttft": "upstream TTFT",
    "decode": "decode",
    "return": "return",
    "tool": "tool",
}


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install matplotlib (the bench extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sizes(summary: dict[str, Any]) -> list[str]:
    """The sizes with at least one mode's runs, smallest first: a time limit or an
    interrupt can leave a size with only some of the modes, or none."""
    return sorted((size for size, per_mode in summary.items() if per_mode), key=int)


def _profiles(agent_loop: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, sec)
        for name, sec in agent_loop.get("profiles", {}).items()
        if _sizes(sec.get("summary") or {})
    ]


def plot_e2e(agent_loop: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    profiles = _profiles(agent_loop)
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.2), squeeze=False)
    for ax, (name, section) in zip(axes[0], profiles, strict=True):
        summary = section["summary"]
        sizes = _sizes(summary)
        modes = [m for m in MODE_COLORS if any(m in summary[s] for s in sizes)]
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            xs = [k + (i - (len(modes) - 1) / 2) * width for k in range(len(sizes))]
            ys = [summary[s].get(mode, {}).get("e2e_s", 0.0) for s in sizes]
            ax.bar(xs, ys, width, label=mode, color=MODE_COLORS[mode])
            if mode == "websocket":
                for x, size, y in zip(xs, sizes, ys, strict=True):
                    entry = summary[size].get(mode, {})  # (not run at every size)
                    reduction = entry.get("e2e_reduction_vs_http_replay")
                    if reduction is not None:  # less time shows as a negative change
                        label = f"{-reduction:+.0%}"
                        ax.annotate(label, (x, y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"N={s}" for s in sizes])
        ax.set_ylabel("end-to-end time (s)")
        ax.set_title(f"{name}: agent run, end to end (median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_turn_latency(agent_loop: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    profiles = _profiles(agent_loop)
    sizes = sorted({s for _n, sec in profiles for s in _sizes(sec["summary"])}, key=int)
    fig, axes = plt.subplots(
        len(profiles), len(sizes), figsize=(4.5 * len(sizes), 3.2 * len(profiles)), squeeze=False
    )
    for row, (name, section) in enumerate(profiles):
        for col, size in enumerate(sizes):
            ax = axes[row][col]
            for mode, entry in section["summary"].get(size, {}).items():
                ys = [v * 1e3 for v in entry["turn_latency_by_index_s"]]
                ax.plot(range(len(ys)), ys, label=mode, color=MODE_COLORS.get(mode), lw=1.3)
            ax.set_title(f"{name}, N={size}", fontsize=10)
            ax.set_xlabel("turn")
            ax.set_ylabel("turn latency (ms)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(agent_loop: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    profiles = _profiles(agent_loop)
    # The largest size that ran, per profile (not the largest configured one).
    largest = {name: _sizes(sec["summary"])[-1] for name, sec in profiles}
    modes = [m for m in MODE_COLORS
             if any(m in sec["summary"][largest[name]] for name, sec in profiles)]  # fmt: skip
    fig, axes = plt.subplots(
        len(profiles), len(modes), figsize=(4 * len(modes), 3.2 * len(profiles)),
        squeeze=False, sharey="row",
    )  # fmt: skip
    for row, (name, section) in enumerate(profiles):
        size = largest[name]
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            entry = section["summary"][size].get(mode)
            if entry is None:
                ax.set_visible(False)
                continue
            by_index = entry["segments_by_index_s"]
            names = list(SEGMENT_COLORS)
            xs = range(len(by_index[names[0]]))
            ax.stackplot(
                xs,
                *[[v * 1e3 for v in by_index[n]] for n in names],
                labels=[SEGMENT_LABELS[n] for n in names],
                colors=[SEGMENT_COLORS[n] for n in names],
            )
            ax.set_title(f"{name}, N={size}: {mode}", fontsize=10)
            ax.set_xlabel("turn")
            ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(throughput: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    points = throughput["points"]
    conns = [p["connections"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conns, [p["warmsocket"]["ops_per_second"] for p in points], "o-",
              label="warmsocket turns/s", color=MODE_COLORS["websocket"])  # fmt: skip
    left.plot(conns, [p["echo"]["ops_per_second"] for p in points], "s--",
              label="websockets echo round trips/s", color="#7f7f7f")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_xticks(conns, [str(c) for c in conns])
    left.set_xlabel("concurrent connections")
    left.set_ylabel("per second")
    left.set_title("throughput (built-in model, loopback)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for key, style in (("p50_s", "o-"), ("p99_s", "^-")):
        right.plot(conns, [p["warmsocket"][key] * 1e3 for p in points], style,
                   label=f"warmsocket turn {key[:3]}", color=MODE_COLORS["websocket"])  # fmt: skip
        right.plot(conns, [p["echo"][key] * 1e3 for p in points], style.replace("-", "--"),
                   label=f"echo {key[:3]}", color="#7f7f7f")  # fmt: skip
    right.axhline(50, color="#d62728", lw=0.8, ls=":", label="50 ms")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(conns, [str(c) for c in conns])
    right.set_xlabel("concurrent connections")
    right.set_ylabel("latency (ms)")
    right.set_title("turn / round-trip latency")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: dict[str, Any], directory: Path) -> list[Path]:
    """Every plot the result file has data for; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    agent_loop = results.get("agent_loop")
    if agent_loop and _profiles(agent_loop):
        out.append(plot_e2e(agent_loop, directory / "agent_e2e.png"))
        out.append(plot_turn_latency(agent_loop, directory / "agent_turn_latency.png"))
        out.append(plot_breakdown(agent_loop, directory / "agent_breakdown.png"))
    throughput = results.get("throughput")
    if throughput and throughput.get("points"):
        out.append(plot_throughput(throughput, directory / "throughput.png"))
    return out
