import pytest

from flaxlesson import plots, training


def _drawn(monkeypatch, history, path):
    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    plots.history_curves(history, path)
    return figures[0]


def test_one_epoch_is_drawn_as_labelled_bars_from_zero_not_a_dot(monkeypatch, tmp_path):
    history = training.History(history={"loss": [0.4], "accuracy": [0.75], "val_accuracy": [0.5]}, epoch=[0])
    fig = _drawn(monkeypatch, history, tmp_path / "curves.png")
    loss_ax, accuracy_ax = fig.axes
    assert [bar.get_height() for bar in accuracy_ax.patches] == pytest.approx([0.75, 0.5])
    assert [label.get_text() for label in accuracy_ax.texts] == ["0.7500", "0.5000"]
    assert accuracy_ax.get_ylim()[0] == 0 and accuracy_ax.get_ylim()[1] == pytest.approx(0.9)
    assert [bar.get_height() for bar in loss_ax.patches] == pytest.approx([0.4])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_several_epochs_are_drawn_as_curves_over_whole_epochs(monkeypatch, tmp_path):
    history = training.History(history={"loss": [1.0, 0.5, 0.25], "accuracy": [0.5, 0.6, 0.7]}, epoch=[0, 1, 2])
    fig = _drawn(monkeypatch, history, tmp_path / "curves.png")
    loss_ax, _ = fig.axes
    assert not loss_ax.patches
    (line,) = loss_ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 0.5, 0.25]
