"""report.md and loss.png beside an export: the run's summary, each block's RTN and tuned loss, and where its time
went. Takes the plain QuantizedModel of a run, nothing of the tuner."""

from __future__ import annotations

import os

from ..models.quantized import PHASES, QuantizedModel


def write_report(qm: QuantizedModel, folder: str) -> None:
    """report.md (per-block RTN vs tuned loss, timing) and loss.png in folder; nothing for an imported checkpoint."""
    if not qm.reports:
        return
    lines = ["# autoround-jax quantization report", "", "```", qm.summary, "```", "",
             f"amp: {qm.compute_dtype} matmuls; seconds split per block into "
             "io (block load), forward (float targets and quantized inputs), step (the tuning loop), compile, "
             "finalize (codes and qdq weights).", "",
             "| block | RTN loss (iter 0) | tuned loss | best iter | seconds | "
             + " | ".join(PHASES) + " |", "|---|---|---|---|---|" + "---|" * len(PHASES)]
    for r in qm.reports:
        fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
        split = " | ".join(f"{r.split[p]:.2f}" if r.split else "-" for p in PHASES)
        lines.append(f"| {r.index} | {fmt(r.loss_rtn)} | {fmt(r.loss_best)} | {fmt(r.best_iter)} | {r.seconds:.2f} | "
                     f"{split} |")
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    tuned = [r for r in qm.reports if r.loss_best is not None]
    if tuned:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([r.index for r in tuned], [r.loss_rtn for r in tuned], "o-", label="RTN (iter 0)")
        ax.plot([r.index for r in tuned], [r.loss_best for r in tuned], "o-", label="tuned (best iter)")
        ax.set_xlabel("block")
        ax.set_ylabel("block output MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "loss.png"), dpi=110)
        plt.close(fig)
