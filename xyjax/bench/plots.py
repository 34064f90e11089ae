"""PNG plots of a ``xyjax bench`` result (matplotlib, no display): throughput bars, latency CDFs and, with a
request-rate sweep, throughput against the Poisson arrival rate."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, axes=()) -> None:
    """Grid on ``axes``, legend on the first, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
    if len(axes):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def throughput_bars(systems: dict, path: str) -> None:
    plt = _pyplot()
    names = list(systems)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.4))
    for offset, key, label in ((-0.2, "total_tokens_per_s", "total"), (0.2, "output_tokens_per_s", "output")):
        values = [systems[n][key] for n in names]
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, names, rotation=15, fontsize=8)
    ax.set_ylabel("tokens / s")
    _save(fig, path, [ax])


def latency_cdfs(systems: dict, path: str) -> None:
    """TTFT and TPOT empirical CDFs per system, from the per-request records."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, s in systems.items():
        recs = s["records"]
        ttft = np.sort([r["first_token"] - r["arrival"] for r in recs])
        tpot = np.sort([1e3 * (r["finish"] - r["first_token"]) / (r["output_len"] - 1) for r in recs
                        if r["output_len"] > 1])
        for ax, values in ((axes[0], ttft), (axes[1], tpot)):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=name)
    axes[0].set_xlabel("time to first token (s)")
    axes[1].set_xlabel("time per output token (ms)")
    for ax in axes:
        ax.set_ylabel("fraction of requests")
    _save(fig, path, axes)


def rate_curve(sweep: dict, path: str) -> None:
    """Throughput (and TTFT p50) against the Poisson request rate, one line per system."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, points in sweep.items():
        rates = [p["rate"] for p in points]
        axes[0].plot(rates, [p["total_tokens_per_s"] for p in points], "o-", label=name)
        axes[1].plot(rates, [p["ttft_p50"] for p in points], "o-", label=name)
    axes[0].set_ylabel("total tokens / s")
    axes[1].set_ylabel("TTFT p50 (s)")
    for ax in axes:
        ax.set_xlabel("request rate (requests / s, Poisson)")
    _save(fig, path, axes)


def save_all(result: dict, stem: str) -> list[str]:
    """Writes ``<stem>-throughput.png``, ``<stem>-latency.png`` and, with a rate sweep, ``<stem>-rates.png``."""
    paths = [f"{stem}-throughput.png", f"{stem}-latency.png"]
    throughput_bars(result["systems"], paths[0])
    latency_cdfs(result["systems"], paths[1])
    if result.get("rate_sweep"):
        paths.append(f"{stem}-rates.png")
        rate_curve(result["rate_sweep"], paths[-1])
    return paths
