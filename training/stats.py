"""What the long-tail remedies do on the real PadChest counts.

`padchest_weight_report()` computes, from the counts CSV's `core_all` column (images per
class in PadChest), the distribution-balanced loss's effective-number class weights and
the repeat-factor sampler's class repeat factors, and returns the rows of the rarest and
the commonest classes. Classes with no PadChest image (Infarction) are left out: neither
remedy can act on a class that has no training positives.
"""

from __future__ import annotations

import os

import numpy as np

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS

from training.data import load_padchest_counts
from training.losses import effective_number_weights
from training.samplers import class_repeat_factors
from training.synth import PADCHEST_IMAGES


def padchest_weight_report(counts_csv: str | os.PathLike | None = None, column: str = "core_all",
                           task1_only: bool = False, k: int = 5, beta: float = 0.9999,
                           threshold: float = 0.05, max_repeat: float = 10.0,
                           num_images: int = PADCHEST_IMAGES, print_table: bool = False) -> list[dict]:
    """Rows {"class", "count", "frequency", "db_weight", "repeat_factor", "rank"} for the `k`
    rarest then the `k` commonest classes (rank 1 = commonest).

    DB weights are normalised to mean 1 over the classes reported on (those with count > 0
    among all 36, or the 30 of Task 1 with task1_only). Repeat factors use the image
    frequency count / num_images, capped at max_repeat as the sampler does.
    """
    table = load_padchest_counts(counts_csv)
    labels = [label for label in (TASK1_LABELS if task1_only else ALL_LABELS) if table[label].counts[column] > 0]
    counts = np.array([table[label].counts[column] for label in labels], dtype=np.float64)
    weights = effective_number_weights(counts, beta)
    frequency = counts / num_images
    repeats = np.minimum(class_repeat_factors(frequency, threshold), max_repeat)

    order = np.argsort(-counts, kind="stable")
    rank = {index: position + 1 for position, index in enumerate(order)}
    chosen = list(order[::-1][:k]) + [i for i in order[:k] if i not in order[::-1][:k]]
    rows = [
        {"class": labels[i], "count": int(counts[i]), "frequency": float(frequency[i]),
         "db_weight": float(weights[i]), "repeat_factor": float(repeats[i]), "rank": rank[i]}
        for i in chosen
    ]
    if print_table:
        _print(rows, column)
    return rows


def _print(rows: list[dict], column: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"PadChest {column}: DB-loss weights and repeat factors (rarest, then commonest)")
    for name in ("rank", "class", "count", "frequency", "db_weight", "repeat_factor"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for row in rows:
        table.add_row(str(row["rank"]), row["class"], str(row["count"]), f"{row['frequency']:.5f}",
                      f"{row['db_weight']:.3f}", f"{row['repeat_factor']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    padchest_weight_report(print_table=True)
