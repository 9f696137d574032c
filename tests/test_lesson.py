import dataclasses
import sys

import pytest

from experiments import cnn_mnist, flags, lesson


def test_quick_lesson_runs_every_section_into_one_report(tmp_path):
    results = lesson.run(lesson.Config(out=str(tmp_path), quick=True))["sections"]
    assert all(r["ok"] for r in results.values())
    report = (tmp_path / "report.md").read_text()
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
