"""``taemi report``: a real tiny run and an experiment folder -> one self-contained HTML
page (figures as PNG data URIs, escaped text, no external resources) and Markdown."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from taemi.config import build_config
from taemi.data.labels import read_labels
from taemi.experiments.report import MAX_CSV_ROWS, build_report
from taemi.synth.features import SynthConfig, make_synth
from taemi.train.trainer import train

PNG = b"\x89PNG\r\n\x1a\n"
NASTY = '<script>alert("x")</script> & Co'


class Page(HTMLParser):
    """Collects what the tests look at: image sources, tables, headings, links, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: list[str] = []
        self.tables = 0
        self.headings: list[str] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._heading: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "table":
            self.tables += 1
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def assert_embedded_pngs(page: Page, n: int) -> None:
    assert len(page.imgs) == n
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG


def assert_offline(text: str, page: Page) -> None:
    for url in page.urls:
        assert url.startswith(("data:", "#")), url
    assert "http://" not in text and "https://" not in text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    synth = make_synth(
        tmp / "synth",
        SynthConfig(clips=40, dims=(12, 10, 8), audio_len=(5, 15), vision_len=(4, 10), seed=0),
        progress=False,
    )
    cfg = build_config(
        "paper",
        [
            ("model.audio_dim", 12),
            ("model.vision_dim", 10),
            ("model.text_dim", 8),
            ("model.hidden", 16),
            ("model.heads", 2),
            ("model.sa_ffn", 32),
            ("model.head_hidden", 16),
            ("train.max_epochs", 2),
            ("train.batch_size", 8),
            ("train.device", "cpu"),
        ],
    )
    res = train(
        cfg,
        synth.store,
        read_labels(synth.train_csv),
        read_labels(synth.valid_csv),
        tmp / "run",
        progress=False,
    )
    return res.run_dir


def test_run_folder_html(run_dir, tmp_path) -> None:
    out = tmp_path / "r.html"
    text = build_report([run_dir], out_html=out)
    assert out.read_text(encoding="utf-8") == text
    page = Page(text)
    assert_offline(text, page)
    assert_embedded_pngs(page, 2)  # learning curves, per-emotion Pearson
    assert page.tables >= 4  # summary, per emotion, config diff, history
    for h in ("Metrics", "Config", "Plots", "History"):
        assert h in page.headings
    metrics = json.loads((run_dir / "metrics.json").read_text())
    valid = metrics["valid"]
    body = page.all_text
    assert f"{valid['mean_pearson']:.4f}" in body
    assert f"{valid['mse']:.4f}" in body
    for emotion, r in valid["pearson"].items():
        assert emotion in body and f"{r:.4f}" in body
        assert f"{valid['ccc'][emotion]:.4f}" in body
    assert "best epoch" in body and "stopped early" in body
    assert "model.hidden" in body  # a non-default key of the config
    assert "<details>" in text and "train_loss" in body


def test_experiment_folder_escapes_and_nests(run_dir, tmp_path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copytree(run_dir, exp / "runs" / "a")
    shutil.copyfile(run_dir / "plots" / "learning_curves.png", exp / "fig.png")
    rows = "\n".join(f"r{i},{i}" for i in range(MAX_CSV_ROWS + 5))
    (exp / "table.csv").write_text(f"name,value\n{NASTY},1\n{rows}\n", encoding="utf-8")
    (exp / "summary.md").write_text(f"# Summary\n{NASTY}\n", encoding="utf-8")
    text = build_report([exp, run_dir], out_html=tmp_path / "r.html")
    page = Page(text)
    assert_offline(text, page)
    assert_embedded_pngs(
        page, 1 + 2
    )  # fig.png, and the run's two plots (nested run's are not repeated)
    assert "<script>" not in text and "&lt;script&gt;" in text and "&amp; Co" in text
    assert page.tags.count("script") == 0
    assert "runs/a" in page.all_text  # nested run listed with its headline metrics
    mean = json.loads((run_dir / "metrics.json").read_text())["valid"]["mean_pearson"]
    assert f"{mean:.4f}" in page.all_text
    assert f"first {MAX_CSV_ROWS} of {MAX_CSV_ROWS + 6} rows" in page.all_text
    assert f"r{MAX_CSV_ROWS + 2}," not in text and f">r{MAX_CSV_ROWS + 2}<" not in text


def test_markdown(run_dir, tmp_path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "t.csv").write_text(f"a|b,c\n{NASTY},2\n", encoding="utf-8")
    (exp / "summary.md").write_text("``` fenced ```\n", encoding="utf-8")
    md = tmp_path / "out" / "report.md"
    build_report([run_dir, exp], out_md=md)
    text = md.read_text(encoding="utf-8")
    assert "## run" in text and "## exp" in text
    links = [line for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 2
    for link in links:
        rel = link.split("](", 1)[1].rstrip(")")
        assert rel.startswith("report_files/")
        assert (md.parent / rel).read_bytes()[:8] == PNG
    assert "a\\|b" in text and "&lt;script&gt;" in text and "<script>" not in text
    assert "````\n``` fenced ```\n````" in text
    assert not (tmp_path / "out" / "report.html").exists()


def test_errors(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        build_report([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*nothing to report"):
        build_report([empty])


def test_cli(run_dir, tmp_path, capsys) -> None:
    import argparse

    from taemi.cli import report_cmd

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    report_cmd.register(sub, lambda sp: sp.add_argument("--no-progress", action="store_true"))
    out, md = tmp_path / "r.html", tmp_path / "r.md"
    args = p.parse_args(["report", str(run_dir), "--out", str(out), "--markdown", str(md)])
    assert args.func(args) == 0
    assert out.is_file() and md.is_file() and (tmp_path / "r_files").is_dir()
    args = p.parse_args(["report", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="missing"):
        args.func(args)
