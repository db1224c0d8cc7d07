"""What `s3search search` prints at the end: the test-split table, the winner's origin and the notes a reader
needs to read the figures right (which split each number comes from, a schedule that stops short of σ = 0)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_table", "winner_name", "format_ratio", "winner_notes", "summary_line"]

METHOD_TITLES = {"s3": "S3", "random": "random", "tpe": "TPE", "cmaes": "CMA-ES"}
EXTRA_TITLES = {"fid": "FID", "clip_score": "CLIP score"}


def format_ratio(value: float, best: float) -> str:
    """value / best as `0.302x`; below 0.01 in scientific notation, so a tiny ratio never reads `0.000x`."""
    if not (math.isfinite(value) and math.isfinite(best)) or best <= 0:
        return "-"
    ratio = value / best
    return f"{ratio:.3f}x" if ratio >= 0.01 else f"{ratio:.2e}x"


def winner_name(result: Any, method: str = "s3") -> str:
    """The table's name for the winner: the method that found it, or the baseline it is."""
    source = getattr(result, "winner_source", "") or ""
    label = getattr(result, "winner_label", "") or ""
    title = METHOD_TITLES.get(method, method)
    if source == "baseline":
        return f"winner = baseline {label}" if label else "winner = a baseline"
    if source == "variant":
        return f"winner = variant {label}" if label else "winner = a baseline variant"
    if source == "refine":
        return f"searched ({title}, grid refinement)"
    return f"searched ({title})"


def _baseline_of(label: str) -> str:
    return label.partition("@")[0]


def format_table(result: Any, nfe: int, method: str = "s3") -> str:
    """The winner vs every baseline on its best grid (named `baseline@grid`), test split, best first; with the
    other metrics the
    evaluations reported (FID and CLIP score of a text-to-image model) as extra columns."""
    searched = winner_name(result, method)
    extras = getattr(result, "test_extras", {}) or {}
    columns = sorted({k for row in extras.values() for k in row})
    rows = [(searched, result.test_value, extras.get("searched", {}), True)]
    grids = getattr(result, "baseline_grids", {}) or {}
    rows += [(f"{name}@{grids[name]}" if grids.get(name) else name, value, extras.get(name, {}), False)
             for name, value in result.baselines.items()]
    rows.sort(key=lambda r: r[1] if math.isfinite(r[1]) else math.inf)
    best_base = min((v for _, v, _, mine in rows if not mine and math.isfinite(v)), default=math.nan)
    width = max(24, max(len(r[0]) for r in rows) + 2)
    head = (f"{'sampler':<{width}}{'test':>14}{'vs best baseline':>18}"
            + "".join(f"{EXTRA_TITLES.get(c, c):>14}" for c in columns))
    higher = "; CLIP score: higher is better" if "clip_score" in columns else ""
    lines = [f"NFE {nfe} - test split (fresh seeds; lower is better{higher})", head]
    for name, value, row, _ in rows:
        lines.append(f"{name:<{width}}{value:>14.6g}{format_ratio(value, best_base):>18}"
                     + "".join(f"{row.get(c, math.nan):>14.6g}" for c in columns))
    return "\n".join(lines)


def summary_line(result: Any, nfe: int) -> str:
    """The winner's score on each split, labelled: the search split chose the candidates, the validation split
    the winner, and only the test split is an unbiased figure."""
    parts = [f"search split {result.best_value:.6g}"]
    if math.isfinite(getattr(result, "validation_value", math.nan)):
        parts.append(f"validation split {result.validation_value:.6g}")
    parts.append(f"test split {result.test_value:.6g}")
    return f"winner (NFE {nfe}): " + ", ".join(parts)


def winner_notes(result: Any) -> list[str]:
    """Notes a reader of the table needs: a baseline winner, and a schedule that ends without a final denoise."""
    notes = []
    source, label = getattr(result, "winner_source", ""), getattr(result, "winner_label", "")
    if source == "baseline":
        name = _baseline_of(label)
        notes.append(f"note: the winner is the baseline {label or name} itself: no searched schedule beat it on the "
                     f"validation split, so its row and the row of {name} (its best grid) may be the same schedule")
    elif source == "variant":
        base, _, rules = label.partition("+")
        first, _, final = rules.partition("/")
        notes.append(f"note: the winner is a structural variant of the baseline {base or 'it was seeded with'}: "
                     f"first step {first or '?'}, final rule {final or '?'}, with any evaluation that frees spent on "
                     f"another step")
    best = result.best
    if getattr(best, "final", "denoise") == "none":
        from .. import processes

        t_end = best.timesteps[-1]
        try:
            sigma = processes.get(best.process).sigma(t_end)
            level = f" (sigma = {sigma:.3g})"
        except (KeyError, ValueError, AttributeError):
            level = ""
        notes.append(f"note: the winner stops at its last time t = {t_end:.4g}{level} without a final denoising step "
                     f"(final: none): its samples are returned at that noise level")
    return notes
