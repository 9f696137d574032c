import dataclasses

from experiments import lesson


def test_quick_lesson_runs_every_section_into_one_report(tmp_path):
    assert lesson.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for section in lesson.SECTIONS:
        assert (tmp_path / section.key / "metrics.json").exists()
        assert f"## {section.title}" in report
    assert "FAILED" not in report
    assert "![curves.png](cnn_mnist/curves.png)" in report
    assert "| test_accuracy |" in report


def test_a_failed_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    mlp = next(s for s in lesson.SECTIONS if s.key == "mlp_iris")
    broken = dataclasses.replace(mlp, key="broken", title="A section that fails", quick=("--epochs", "0"))
    monkeypatch.setattr(lesson, "SECTIONS", (broken, mlp))
    assert lesson.main(["--quick", "--out", str(tmp_path)]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "| [A section that fails](#broken) | **FAILED** |" in report
    assert "**This section failed.**" in report and "epochs" in report
    assert (tmp_path / "mlp_iris" / "metrics.json").exists()
