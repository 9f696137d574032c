import dataclasses
import sys

import pytest

from experiments import cnn_mnist, flags, lesson
from flaxlesson import plots, training


def test_quick_lesson_runs_every_section_into_one_report(tmp_path):
    results = lesson.run(lesson.Config(out=str(tmp_path), quick=True))["sections"]
    assert all(r["ok"] for r in results.values())
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= len(lesson.SECTIONS)
    for section in lesson.SECTIONS:
        assert (tmp_path / section.key / "metrics.json").exists()
        assert (tmp_path / section.key / "log.txt").stat().st_size > 0
        assert f"## {section.title}" in report
    assert "FAILED" not in report
    assert "![curves.png](cnn_mnist/curves.png)" in report
    assert "| test_accuracy |" in report


def test_a_failed_section_is_reported_and_the_others_still_run(tmp_path):
    cnn, mlp = (next(s for s in lesson.SECTIONS if s.key == key) for key in ("cnn_mnist", "mlp_iris"))
    missing = cnn_mnist.Config(dataset="idx", data_dir=str(tmp_path / "no_images"))
    broken = dataclasses.replace(cnn, key="broken", title="A section that fails", quick=missing)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lesson, "SECTIONS", (broken, mlp))
        assert lesson.main(["--quick", "--out", str(tmp_path)]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "| [A section that fails](#broken) | **FAILED** |" in report
    assert "**This section failed.**" in report and "no_images is not a directory" in report
    assert (tmp_path / "mlp_iris" / "metrics.json").exists()


@pytest.mark.parametrize("section", lesson.SECTIONS, ids=[s.key for s in lesson.SECTIONS])
def test_each_sections_configs_go_to_its_script_as_flags_that_parse_back(section):
    module = sys.modules[type(section.full).__module__]
    for config in (section.full, section.quick):
        parser = flags.parser(module.__doc__, type(config)())
        assert flags.config(parser, type(config), parser.parse_args(flags.to_argv(config))) == config


def _section_result(tmp_path, section):
    folder = tmp_path / section.key
    folder.mkdir()
    history = training.History(history={"loss": [1.0, 0.5], "accuracy": [0.5, 0.75]}, epoch=[0, 1])
    plots.history_curves(history, folder / "curves.png")
    return {
        "ok": True,
        "interrupted": False,
        "seconds": 1.5,
        "command": f"experiments/{section.key}.py --quick",
        "metrics": {"test_accuracy": 0.875},
        "error": "",
        "plots": ["curves.png"],
        "summary": lesson.model_summary(section, section.full),
    }


def test_the_report_shows_each_models_summary_beside_keras_count(tmp_path):
    sections = {s.key: s for s in lesson.SECTIONS}
    results = {key: _section_result(tmp_path, sections[key]) for key in ("cnn_mnist", "augmentation")}
    report = lesson.write_report(tmp_path, results, None, quick=False).read_text()
    assert "| Conv_1 (ConvMaxPool) | (None, 5, 5, 64) | 18,496 |" in report
    assert "| **total** |  | **225,034** |" in report
    assert "225,034 params; Keras's `model.summary()` of the lesson's model: 225,034 (the same)" in report


def test_each_lesson_model_has_keras_count_with_the_lessons_settings():
    for section in lesson.SECTIONS:
        model = lesson.model_summary(section, section.full)
        if section.keras_params is not None:
            assert model["total_params"] == section.keras_params, section.key


def test_the_html_report_is_one_page_with_the_plots_inline(tmp_path):
    sections = {s.key: s for s in lesson.SECTIONS}
    results = {key: _section_result(tmp_path, sections[key]) for key in ("mlp_iris", "cnn_mnist")}
    lesson.write_report(tmp_path, results, None, quick=True)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('<img src="data:image/png;base64,') == 2
    assert 'src="cnn_mnist' not in page and "<link" not in page
    assert '<h2 id="cnn_mnist">2.1 A convolutional network on MNIST-style images</h2>' in page
    assert '<a href="#cnn_mnist">' in page and "<td>225,034</td>" not in page and "<strong>225,034</strong>" in page
    assert "<code>experiments/cnn_mnist.py --quick</code>" in page


def test_the_report_shows_the_notebooks_plain_jax_and_cites_keras_without_running_it(tmp_path):
    sections = {s.key: s for s in lesson.SECTIONS}
    results = {"cnn_mnist": _section_result(tmp_path, sections["cnn_mnist"])}
    report = lesson.write_report(tmp_path, results, None, quick=True).read_text()
    cnn = report.split('<a id="cnn_mnist"></a>')[1]
    assert "Conv2D(32, kernel_size=(3, 3), activation='relu', input_shape=(28, 28, 1))," in cnn
    assert "from `lesson/2_1_cnn.ipynb`, which runs it" in cnn
    assert 'nn.Conv(32, (3, 3), padding="VALID", **keras_init)' in cnn and "jax.value_and_grad(loss_fn" in cnn
    assert "training.fit(" not in cnn
    assert "test accuracy 0.897" in cnn and "TensorFlow 2.21" in cnn and "do not compare with it" in cnn
    assert "**Quick settings**" in report


def test_the_report_says_where_an_image_sections_data_came_from(tmp_path):
    sections = {s.key: s for s in lesson.SECTIONS}
    result = _section_result(tmp_path, sections["cnn_mnist"])
    result["metrics"] |= {"dataset": "digits", "dataset_source": "scikit-learn's bundled load_digits, 8x8 resized"}
    report = lesson.write_report(tmp_path, {"cnn_mnist": result}, None, quick=True).read_text()
    assert '| dataset_source | "scikit-learn\'s bundled load_digits, 8x8 resized" |' in report


def test_a_figure_that_did_not_run_reads_as_a_dash_not_null():
    assert lesson._figure_rows({"masking": {"interrupted": None, "test_accuracy": 0.5}}, ("masking",)) == [
        ("masking.interrupted", "—"),
        ("masking.test_accuracy", "0.5"),
    ]
