"""The report card: sections in pipeline order, the summary table, reset."""

import os

from jaxchat.report import Report, get_report


def test_generate_collects_sections_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = get_report()
    report.reset()
    report.log(section="Base model training", data=[{"depth": 4, "Total training time": "120.00m"}])
    report.log(section="Base model evaluation", data=[{"CORE": 0.2219, "val_bpb": 0.81}])
    report.log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.39, "GSM8K": 0.045, "ChatCORE": 0.25}])
    report.log(section="Tokenizer training", data=["some *markdown*", {"vocab_size": 32768}])
    path = report.generate()
    text = open(path).read()
    assert text.startswith("# jaxchat training report")
    # sections in pipeline order, whatever order they were logged in
    order = [text.index(f"## {s}") for s in ("Tokenizer training", "Base model training", "Base model evaluation",
                                              "Chat evaluation sft", "Summary")]
    assert order == sorted(order)
    assert "- vocab_size: 32,768" in text
    assert "| CORE | 0.2219 | - | - |" in text
    assert "| ARC-Easy | - | 0.3900 | - |" in text
    assert text.index("| CORE |") < text.index("| ARC-Easy |") < text.index("| ChatCORE |")
    assert "Total wall clock time: 0h0m" in text
    assert "Training time: 2.00h" in text  # CPU: timed but not priced
    assert os.path.exists(tmp_path / "report.md")


def test_reset_removes_old_sections(tmp_path):
    report = Report(str(tmp_path / "r"))
    report.log(section="Chat SFT", data=[{"loss": 1.0}])
    report.reset()
    assert sorted(os.listdir(tmp_path / "r")) == ["header.md"]
    text = open(report.generate(copy_to=None)).read()
    assert "## Chat SFT" not in text and "Run started:" in text
