"""The report's plots: bar charts of the overhead and failover results (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from _report_common import cell_name, load


def plots(folder: Path) -> None:
    """Bar charts of the overhead and failover results (needs matplotlib, the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if data := load("overhead"):
        rows = data["results"]["rows"]
        cells = list(dict.fromkeys(cell_name(r) for r in rows))
        clients = list(dict.fromkeys(r["client"] for r in rows))
        fig, ax = plt.subplots(figsize=(14, 5.5))
        width = 0.85 / len(clients)
        for i, client in enumerate(clients):
            values = [
                next((r["per_cpu_s"] for r in rows if cell_name(r) == c and r["client"] == client), 0) for c in cells
            ]
            ax.bar([x + i * width for x in range(len(cells))], values, width, label=client)
        ax.set_xticks([x + 0.85 / 2 for x in range(len(cells))], cells, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("requests per client CPU-second")
        ax.set_title("Client overhead (higher is better)")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(folder / "overhead.png", dpi=90)
        plt.close(fig)
    if data := load("failover"):
        rows = data["results"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["client"] for r in rows]
        axes[0].bar(names, [r["p99_no_fault_ms"] for r in rows], 0.4, label="no fault")
        axes[0].bar([i + 0.4 for i in range(len(rows))], [r["p99_ms"] for r in rows], 0.4, label="kill + hang")
        axes[0].set_ylabel("p99 latency ms")
        axes[0].legend()
        attempts = [(r["killed_route_attempts_after"] or 0) + (r["hung_route_attempts_after"] or 0) for r in rows]
        axes[1].bar(names, attempts)
        axes[1].set_ylabel("failed attempts on faulted servers (0: not reported)")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle("Failover cost (lower is better)")
        fig.tight_layout()
        fig.savefig(folder / "failover.png", dpi=90)
        plt.close(fig)
