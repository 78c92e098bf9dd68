"""raydpo.plots: real matplotlib, real PNG files."""
from __future__ import annotations

import math
import threading
from pathlib import Path

import matplotlib.image
import pytest

from raydpo import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN, INF = float("nan"), float("inf")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert not list(path.parent.glob(f".{path.name}.*")), "temp file left behind"


def full_history() -> dict[str, list[tuple[int, float]]]:
    steps = range(1, 11)
    return {
        "loss": [(s, 0.69 - 0.03 * s) for s in reversed(steps)],  # out of order on purpose
        "eval_loss": [(5, 0.6), (10, 0.5)],
        "rewards/accuracies": [(s, 0.5 + 0.04 * s) for s in steps],
        "eval_rewards/accuracies": [(5, 0.6), (10, 0.7)],
        "logps/chosen": [(s, -50.0 - s) for s in steps],
        "logps/rejected": [(s, -52.0 - 2 * s) for s in steps],
        "eval_logps/chosen": [(10, -60.0)],
        "eval_logps/rejected": [(10, -70.0)],
        "rewards/chosen": [(s, -0.01 * s) for s in steps],
        "rewards/rejected": [(s, -0.05 * s) for s in steps],
    }


def line_labels(fig) -> list[list[str]]:
    return [[line.get_label() for line in ax.lines] for ax in fig.axes]


# ---------------------------------------------------------------- history_from_rows


def test_history_from_rows_sorts_and_keeps_last_value_per_step():
    rows = [("loss", 2, 0.5), ("loss", 1, 0.7), ("eval_loss", 1, 0.8), ("loss", 2, 0.4)]
    assert plots.history_from_rows(rows) == {"loss": [(1, 0.7), (2, 0.4)], "eval_loss": [(1, 0.8)]}
    assert plots.history_from_rows([]) == {}


# ---------------------------------------------------------------- training_curves


def test_training_curves_writes_png_creating_folder(tmp_path):
    path = tmp_path / "a" / "b" / "training_curves.png"
    assert plots.training_curves(full_history(), path) == path
    assert_png(path)


def test_training_curves_draws_one_line_per_metric_present():
    fig = plots._figure_training_curves(full_history())
    assert line_labels(fig) == [["loss", "eval_loss"], ["rewards/accuracies", "eval_rewards/accuracies"]]
    assert all(ax.get_legend() is not None for ax in fig.axes)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)

    fig = plots._figure_training_curves({"loss": [(1, 0.7)], "unrelated": [(1, 1.0)]})
    assert line_labels(fig) == [["loss"], []]


def test_training_curves_sorts_steps_and_skips_nan_inf(tmp_path):
    history = {"loss": [(3, 0.5), (1, 0.7), (2, NAN), (4, INF), (5, -INF)]}
    fig = plots._figure_training_curves(history)
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1, 3]
    assert list(line.get_ydata()) == [0.7, 0.5]
    assert_png(plots.training_curves(history, tmp_path / "t.png"))


@pytest.mark.parametrize(
    "history",
    [{}, {"loss": []}, {"loss": [(1, NAN), (2, INF)]}, {"logps/chosen": [(1, -3.0)]}],
    ids=["empty", "no-points", "only-nonfinite", "other-metrics"],
)
def test_training_curves_none_without_points_writes_nothing(tmp_path, history):
    assert plots.training_curves(history, tmp_path / "sub" / "t.png") is None
    assert not (tmp_path / "sub").exists()


# ---------------------------------------------------------------- logps_curves


def test_logps_curves_two_panels_and_title(tmp_path):
    fig = plots._figure_logps_curves(full_history())
    assert line_labels(fig) == [
        ["logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"],
        ["rewards/chosen", "rewards/rejected"],
    ]
    assert "chosen" in fig.get_suptitle() and "fall" in fig.get_suptitle()
    path = plots.logps_curves(full_history(), tmp_path / "logps.png")
    assert_png(path)


def test_logps_curves_one_panel_without_rewards(tmp_path):
    history = {"logps/chosen": [(1, -5.0), (2, NAN)], "logps/rejected": [(1, -6.0), (2, -INF)]}
    fig = plots._figure_logps_curves(history)
    assert line_labels(fig) == [["logps/chosen", "logps/rejected"]]
    assert_png(plots.logps_curves(history, tmp_path / "l.png"))


def test_logps_curves_none_without_points(tmp_path):
    assert plots.logps_curves({"loss": [(1, 0.7)], "logps/chosen": [(1, NAN)]}, tmp_path / "l.png") is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- margin_histogram


def test_margin_histogram_title_has_fraction_positive(tmp_path):
    margins = [-1.0, 0.5, 2.0, 0.0, NAN, INF, 3.0]  # finite: 5, of which > 0: 3
    fig = plots._figure_margin_histogram(margins, step=40)
    title = fig.axes[0].get_title()
    assert "60.0%" in title and "step 40" in title
    (zero_line,) = fig.axes[0].lines
    assert list(zero_line.get_xdata()) == [0.0, 0.0]
    counts = sum(patch.get_height() for patch in fig.axes[0].patches)
    assert counts == 5
    assert_png(plots.margin_histogram(margins, tmp_path / "m.png", step=40))


@pytest.mark.parametrize("margins", [[], [NAN, INF]])
def test_margin_histogram_none_for_empty(tmp_path, margins):
    assert plots.margin_histogram(margins, tmp_path / "m.png") is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- rounds_plot


def rounds() -> list[dict[str, float]]:
    return [
        {"round/judge_score_mean": 0.2, "round/judge_score_std": 0.1, "round/kl_to_initial": 0.0},
        {"round/judge_score_mean": 0.5, "round/judge_score_std": 0.2, "round/kl_to_initial": 1.5},
        {"round/judge_score_mean": 0.6, "round/kl_to_initial": NAN},  # no std, KL not finite
    ]


def test_rounds_plot_panels_reflect_data(tmp_path):
    fig = plots._figure_rounds(rounds())
    score_ax, kl_ax, frontier_ax = fig.axes
    assert list(score_ax.lines[0].get_ydata()) == [0.2, 0.5, 0.6]
    assert list(kl_ax.lines[0].get_xdata()) == [0, 1]
    assert list(frontier_ax.lines[0].get_xdata()) == [0.0, 1.5]
    assert list(frontier_ax.lines[0].get_ydata()) == [0.2, 0.5]
    assert [t.get_text() for t in frontier_ax.texts] == ["0", "1"]  # points labelled with the round
    assert len(score_ax.collections) == 1  # the std band
    assert_png(plots.rounds_plot(rounds(), tmp_path / "rounds.png"))


def test_rounds_plot_first_round_numbers_points():
    fig = plots._figure_rounds(rounds(), first_round=1)
    assert [t.get_text() for t in fig.axes[2].texts] == ["1", "2"]


def test_rounds_plot_only_kl():
    fig = plots._figure_rounds([{"round/kl_to_initial": 0.3}, {}])
    assert [len(ax.lines) for ax in fig.axes] == [0, 1, 0]


@pytest.mark.parametrize(
    "data",
    [[], [{}], [{"round/judge_score_std": 0.1}], [{"round/judge_score_mean": NAN, "other": 1.0}]],
    ids=["empty", "empty-round", "std-only", "nan-only"],
)
def test_rounds_plot_none_without_keys(tmp_path, data):
    assert plots.rounds_plot(data, tmp_path / "r.png") is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- writing


def test_overwrites_atomically_and_from_threads(tmp_path):
    """No pyplot state: figures drawn from several threads at once all come out whole."""
    errors: list[BaseException] = []

    def draw(i: int) -> None:
        try:
            plots.margin_histogram([math.sin(k + i) for k in range(50)], tmp_path / f"m{i}.png", step=i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert_png(tmp_path / f"m{i}.png")
    plots.margin_histogram([1.0], tmp_path / "m0.png")  # overwrite in place
    assert_png(tmp_path / "m0.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{i}.png" for i in range(2)]


def test_imports_no_pyplot_torch_ray_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, raydpo.plots; "
        "print([m for m in ('matplotlib.pyplot', 'torch', 'ray', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
