"""The PNG plots of a DPO run, drawn from plain Python data (the Tracker logs them to MLflow).

Each public function takes lists of numbers, draws one figure on the non-interactive Agg canvas
(a `matplotlib.figure.Figure` of its own, never pyplot's global state, so it is safe inside a
training worker thread), writes the PNG atomically (temp file in the same folder, then
`os.replace`) and returns its path; it returns None and writes nothing when there is nothing to
draw. NaN and inf values are skipped. No MLflow, Ray or torch here.

What each plot shows, and why one looks at it:

- `training_curves`: the DPO loss (train and eval) and the reward accuracy, i.e. the fraction of
  pairs whose chosen answer gets the higher implicit reward (train and eval), against the optimizer
  step. The first look at any run: is the loss falling, is eval following train or is it
  over-fitting, has accuracy saturated at 1.0 (the pairs are too easy, or beta is too small)?
- `logps_curves`: the summed log-probabilities of the chosen and rejected completions under the
  policy, and the implicit rewards beta * log(pi / pi_ref) of each. DPO only asks that chosen rises
  *relative to* rejected; a common failure is that both fall, chosen included, so the policy moves
  probability mass to text that is in neither. This plot shows that at a glance.
- `margin_histogram`: the per-pair reward margins beta * ((pi_c - ref_c) - (pi_r - ref_r)) on the
  eval pairs at one step, with the line at 0. The fraction right of 0 is the eval accuracy; the
  shape shows whether a few pairs dominate or the whole set moves, and how far the margins grow
  (very large margins are a sign of over-optimisation).
- `rounds_plot`: for iterative (online) DPO, per round: the judge's mean score (with its standard
  deviation), the KL of the round's policy to the initial one, and the reward-vs-KL frontier (as in
  Fig. 2 of the DPO paper): does each round buy judge score, and at what divergence?
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

History = Mapping[str, Sequence[tuple[int, float]]]
"""Metric name -> [(step, value), ...], in any order."""

STEP_LABEL = "step (optimizer steps)"
_DPI = 100


def history_from_rows(rows: Iterable[tuple[str, int, float]]) -> dict[str, list[tuple[int, float]]]:
    """(key, step, value) rows -> History, each key's points sorted by step.

    The same (key, step) seen twice keeps the last value (a resumed run re-logs a step).
    """
    by_key: dict[str, dict[int, float]] = {}
    for key, step, value in rows:
        by_key.setdefault(key, {})[int(step)] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def training_curves(history: History, path: Path) -> Path | None:
    """Loss and reward accuracy (train and eval) vs step; None when none of them has a point."""
    return _save(_figure_training_curves(history), path)


def logps_curves(history: History, path: Path) -> Path | None:
    """Chosen/rejected log-probs (and implicit rewards) vs step; None when none has a point."""
    return _save(_figure_logps_curves(history), path)


def margin_histogram(margins: Sequence[float], path: Path, step: int | None = None) -> Path | None:
    """Histogram of per-pair eval reward margins; None when there is no finite margin."""
    return _save(_figure_margin_histogram(margins, step), path)


def rounds_plot(rounds: Sequence[Mapping[str, float]], path: Path, first_round: int = 0) -> Path | None:
    """Judge score and KL to the initial policy per online round; None when no round has either.

    `rounds[i]` is round `first_round + i`.
    """
    return _save(_figure_rounds(rounds, first_round), path)


# ---------------------------------------------------------------------------------------------
# Figures (internal; the tests inspect them before they are saved)

_ROUND_SCORE = "round/judge_score_mean"
_ROUND_STD = "round/judge_score_std"
_ROUND_KL = "round/kl_to_initial"


def _figure_training_curves(history: History) -> Figure | None:
    panels = [
        (("loss", "eval_loss"), "DPO loss", "loss (nats)"),
        (
            ("rewards/accuracies", "eval_rewards/accuracies"),
            "Reward accuracy (chosen reward > rejected)",
            "accuracy (fraction of pairs)",
        ),
    ]
    series = [[(key, _points(history, key)) for key in keys] for keys, _, _ in panels]
    if not any(points for panel in series for _, points in panel):
        return None
    fig = _new_figure(ncols=2)
    for ax, (_, title, ylabel), panel in zip(fig.axes, panels, series):
        _draw_series(ax, panel, title, ylabel)
    fig.axes[1].set_ylim(-0.02, 1.02)
    fig.suptitle("Training curves")
    return fig


def _figure_logps_curves(history: History) -> Figure | None:
    logps = [(k, _points(history, k)) for k in _both("logps/chosen", "logps/rejected")]
    rewards = [(k, _points(history, k)) for k in _both("rewards/chosen", "rewards/rejected")]
    has_logps = any(points for _, points in logps)
    has_rewards = any(points for _, points in rewards)
    if not (has_logps or has_rewards):
        return None
    fig = _new_figure(ncols=int(has_logps) + int(has_rewards))
    axes = iter(fig.axes)
    if has_logps:
        _draw_series(
            next(axes),
            logps,
            "Policy log-probs of chosen and rejected",
            "log-prob (nats, summed over completion tokens)",
        )
    if has_rewards:
        _draw_series(
            next(axes),
            rewards,
            "Implicit rewards β·log(π/π_ref)",
            "reward (nats, scaled by β)",
        )
    fig.suptitle("Chosen vs rejected: does the chosen log-prob fall too? (both falling is a common DPO failure)")
    return fig


def _figure_margin_histogram(margins: Sequence[float], step: int | None) -> Figure | None:
    values = [float(m) for m in margins if _finite(m)]
    if not values:
        return None
    positive = sum(1 for m in values if m > 0) / len(values)
    fig = _new_figure(ncols=1)
    ax = fig.axes[0]
    bins = min(50, max(10, int(math.sqrt(len(values)))))
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8, label=f"{len(values)} eval pairs")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1, label="margin = 0")
    ax.set_xlabel("reward margin β·((π_c − ref_c) − (π_r − ref_r)) (nats)")
    ax.set_ylabel("pairs (count)")
    where = f" at step {step}" if step is not None else ""
    ax.set_title(f"Eval reward margins{where}: {positive:.1%} > 0")
    ax.legend()
    return fig


def _figure_rounds(rounds: Sequence[Mapping[str, float]], first_round: int = 0) -> Figure | None:
    numbered = list(enumerate(rounds, start=first_round))
    score = [(r, float(d[_ROUND_SCORE])) for r, d in numbered if _finite(d.get(_ROUND_SCORE))]
    kl = [(r, float(d[_ROUND_KL])) for r, d in numbered if _finite(d.get(_ROUND_KL))]
    if not score and not kl:
        return None
    std = {r: float(d[_ROUND_STD]) for r, d in numbered if _finite(d.get(_ROUND_STD))}
    fig = _new_figure(ncols=3)
    ax_score, ax_kl, ax_front = fig.axes

    if score:
        xs = [r for r, _ in score]
        ys = [y for _, y in score]
        ax_score.plot(xs, ys, marker="o", color="tab:blue", label="judge score (mean)")
        banded = [(r, y, std[r]) for r, y in score if r in std]
        if banded:
            ax_score.fill_between(
                [r for r, _, _ in banded],
                [y - s for _, y, s in banded],
                [y + s for _, y, s in banded],
                color="tab:blue",
                alpha=0.2,
                label="± 1 std",
            )
        ax_score.legend()
    else:
        _no_data(ax_score)
    ax_score.set_title("Judge score per round")
    ax_score.set_xlabel("round")
    ax_score.set_ylabel("judge score (judge's scale)")

    if kl:
        ax_kl.plot(
            [r for r, _ in kl], [y for _, y in kl], marker="o", color="tab:red", label="KL(π_round ‖ π_initial)"
        )
        ax_kl.legend()
    else:
        _no_data(ax_kl)
    ax_kl.set_title("KL to the initial policy per round")
    ax_kl.set_xlabel("round")
    ax_kl.set_ylabel("KL (nats)")

    kl_by_round = dict(kl)
    frontier = [(kl_by_round[r], y, r) for r, y in score if r in kl_by_round]
    if frontier:
        ax_front.plot(
            [x for x, _, _ in frontier],
            [y for _, y, _ in frontier],
            linestyle=":",
            marker="o",
            color="tab:green",
            label="rounds",
        )
        ax_front.margins(0.1)
        for x, y, r in frontier:
            ax_front.annotate(str(r), (x, y), textcoords="offset points", xytext=(4, 4))
        ax_front.legend()
    else:
        _no_data(ax_front, "needs judge score and KL in the same round")
    ax_front.set_title("Reward vs KL frontier")
    ax_front.set_xlabel("KL to the initial policy (nats)")
    ax_front.set_ylabel("judge score (judge's scale)")

    for ax in (ax_score, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Iterative DPO rounds")
    return fig


# ---------------------------------------------------------------------------------------------
# Helpers


def _both(*keys: str) -> list[str]:
    """The train keys, then their eval_ variants."""
    return [*keys, *(f"eval_{k}" for k in keys)]


def _finite(value: object) -> bool:
    try:
        return value is not None and math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _points(history: History, key: str) -> list[tuple[int, float]]:
    """The key's finite points, sorted by step."""
    return sorted((int(s), float(v)) for s, v in history.get(key, ()) if _finite(v))


def _no_data(ax, why: str = "no points yet") -> None:
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="gray")


def _new_figure(ncols: int) -> Figure:
    fig = Figure(figsize=(6.0 * ncols, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(1, ncols, squeeze=False)
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    return fig


def _draw_series(ax, series: Sequence[tuple[str, list[tuple[int, float]]]], title: str, ylabel: str) -> None:
    """One line per key that has points; eval keys dashed with markers (they are sparse)."""
    colors = {"chosen": "tab:green", "rejected": "tab:red"}
    for key, points in series:
        if not points:
            continue
        is_eval = key.startswith("eval_")
        color = next((c for word, c in colors.items() if key.endswith(word)), "tab:orange" if is_eval else "tab:blue")
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            label=key,
            color=color,
            linestyle="--" if is_eval else "-",
            marker="o" if is_eval or len(points) == 1 else None,
            markersize=4,
        )
    if ax.lines:
        ax.legend()
    else:
        _no_data(ax)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)


def _save(fig: Figure | None, path: Path) -> Path | None:
    """Write the figure as PNG atomically; None (nothing written) for no figure."""
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an artifact should read like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
