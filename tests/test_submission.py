"""ABAW submissions: the writer (sorted, header, clipped by default) and the checker
(every kind of problem, the leading-zero message, exit codes of ``taemi check-submission``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from taemi import EMI_EMOTIONS
from taemi.cli.main import main
from taemi.eval.submission import check_submission, write_submission

IDS = [f"{i:05d}" for i in range(0, 80, 7)]  # 00000, 00007, ... 00077: 12 test ids
HEADER = "Filename," + ",".join(EMI_EMOTIONS)


def write_ids(path: Path, ids=IDS) -> Path:
    path.write_text("Filename\n" + "\n".join(ids) + "\n", encoding="utf-8")
    return path


def rows(ids, value: str = "0.5") -> list[str]:
    return [f"{i}," + ",".join([value] * len(EMI_EMOTIONS)) for i in ids]


def submission(path: Path, lines: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def problems(path: Path, ids=IDS, **kw) -> list[str]:
    return check_submission(path, ids, **kw).problems


# --------------------------------------------------------------------------- writer


def test_write_submission_sorted_header_clipped(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ids = list(reversed(IDS))  # given unsorted
    values = rng.uniform(
        -0.5, 1.5, size=(len(ids), len(EMI_EMOTIONS))
    )  # (N, E), some outside [0, 1]
    out = tmp_path / "sub.csv"
    write_submission(out, ids, EMI_EMOTIONS, values)
    with open(out, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["Filename", *EMI_EMOTIONS]
    assert [r[0] for r in table[1:]] == sorted(IDS)  # sorted, zero padding kept
    got = np.array([r[1:] for r in table[1:]], dtype=np.float64)
    want = np.clip(values[::-1], 0.0, 1.0)  # rows of the sorted ids
    np.testing.assert_array_equal(got, want)
    assert check_submission(out, IDS).ok

    raw = tmp_path / "raw.csv"
    write_submission(raw, ids, EMI_EMOTIONS, values, clip=False)
    with open(raw, newline="", encoding="utf-8") as fh:
        got_raw = np.array([r[1:] for r in list(csv.reader(fh))[1:]], dtype=np.float64)
    np.testing.assert_array_equal(got_raw, values[::-1])  # raw values, exactly
    report = check_submission(raw, IDS)
    assert not report.ok and any(
        p.startswith("rows with values outside [0, 1]") for p in report.problems
    )


# --------------------------------------------------------------------------- checker


def test_valid_submission_passes(tmp_path) -> None:
    report = check_submission(submission(tmp_path / "s.csv", rows(IDS)), IDS)
    assert report.ok and report.problems == [] and report.warnings == [] and report.rows == len(IDS)


def test_leading_zeros_lost_are_named(tmp_path) -> None:
    lost = [str(int(i)) for i in IDS]  # "0", "7", "14", ...: read as integers somewhere
    found = problems(submission(tmp_path / "s.csv", rows(lost)))
    assert len(found) == 1, found  # one kind, not also "missing" + "extra"
    msg = found[0]
    assert msg.startswith(f"ids that lost their leading zeros ({len(IDS)})")
    assert "'7' should be '00007'" in msg and "dtype={'Filename': str}" in msg
    # a float written by a number-minded tool: 42.0
    found = problems(submission(tmp_path / "f.csv", rows([*IDS[:-1], f"{int(IDS[-1])}.0"])))
    assert found[0].startswith(
        f"ids that lost their leading zeros (1): line {len(IDS) + 1}: '77.0' should be '00077' ("
    )


@pytest.mark.parametrize(
    ("lines", "header", "kind", "detail"),
    [
        (rows(IDS[:-2]), HEADER, "test ids without a row (2)", "'00070'"),
        (rows([*IDS, "99999"]), HEADER, "ids not in the test list (1)", "'99999' (line 14)"),
        (rows([*IDS[:3], IDS[2], *IDS[3:]]), HEADER, "duplicate ids (1)", "'00014' on lines 4, 5"),
        (
            [*rows(IDS[:-1]), f"{IDS[-1]},0.5,0.5"],
            HEADER,
            "rows with the wrong number of fields (1)",
            "line 13: 3 fields, not 7",
        ),
        (
            [*rows(IDS[:-1]), f"{IDS[-1]},0.5,abc,0.5,0.5,0.5,0.5"],
            HEADER,
            "rows with values that are not numbers (1)",
            "line 13, 00077: Amusement 'abc'",
        ),
        (
            [*rows(IDS[:-1]), f"{IDS[-1]},0.5,0.5,,0.5,0.5,-"],
            HEADER,
            "rows with values that are not numbers (1)",
            "Determination '', Joy '-'",
        ),
        (
            [*rows(IDS[:-2]), *rows(IDS[-2:], "nan")],
            HEADER,
            "rows with NaN or infinite values (2)",
            "line 12, 00070: Admiration 'nan', Amusement 'nan'",
        ),
        (
            [*rows(IDS[:-1]), *rows(IDS[-1:], "inf")],
            HEADER,
            "rows with NaN or infinite values (1)",
            "Joy 'inf'",
        ),
        (
            [*rows(IDS[:-1]), *rows(IDS[-1:], "1.25")],
            HEADER,
            "rows with values outside [0, 1] (1)",
            "line 13, 00077: Admiration 1.25, Amusement 1.25",
        ),
        (
            [*rows(IDS[:-1]), *rows(IDS[-1:], "-0.01")],
            HEADER,
            "rows with values outside [0, 1] (1)",
            "Joy -0.01",
        ),
        (
            rows([IDS[1], IDS[0], *IDS[2:]]),
            HEADER,
            "rows not sorted by id",
            "line 3: '00000' comes after '00007'",
        ),
        (
            [*rows(IDS[:-1]), " 00077," + ",".join(["0.5"] * 6)],
            HEADER,
            "ids with spaces around them (1)",
            "line 13: ' 00077'",
        ),
        ([*rows(IDS), ",0.5,0.5,0.5,0.5,0.5,0.5"], HEADER, "rows without an id (1)", "line 14"),
    ],
)
def test_each_problem_kind(tmp_path, lines, header, kind, detail) -> None:
    found = problems(submission(tmp_path / "s.csv", lines, header))
    assert len(found) == 1, found
    assert found[0].startswith(kind), found
    assert detail in found[0], found


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("filename," + ",".join(EMI_EMOTIONS), "missing ['Filename']; unexpected ['filename']"),
        ("Filename," + ",".join(reversed(EMI_EMOTIONS)), "the right columns in the wrong order"),
        ("Filename, " + ", ".join(EMI_EMOTIONS), "spaces around column names"),
        ("Filename," + ",".join(EMI_EMOTIONS[:-1]), "missing ['Joy']"),
        ("00000," + ",".join(["0.1"] * 6), "no header row: the first line looks like data"),
    ],
)
def test_header_problems(tmp_path, header, says) -> None:
    found = problems(submission(tmp_path / "s.csv", rows(IDS), header))
    assert found and says in found[0], found
    assert HEADER in found[0]  # the message shows the expected header


def test_first_examples_then_a_count(tmp_path) -> None:
    found = problems(submission(tmp_path / "s.csv", rows(IDS[:2])))  # 10 ids have no row
    assert found == [
        "test ids without a row (10): '00014'; '00021'; '00028'; '00035'; '00042'; ... and 5 more"
    ]
    found = check_submission(tmp_path / "s.csv", IDS, max_listed=2).problems
    assert found == ["test ids without a row (10): '00014'; '00021'; ... and 8 more"]


def test_several_kinds_are_all_reported(tmp_path) -> None:
    lines = [*rows([IDS[1], IDS[0]]), *rows(IDS[3:-1], "2"), "oops,1,2"]
    found = problems(submission(tmp_path / "s.csv", lines))
    kinds = [p.split(" (")[0] for p in found]
    assert kinds == [
        "rows with the wrong number of fields",
        "ids not in the test list",
        "test ids without a row",
        "rows with values outside [0, 1]",
        "rows not sorted by id",
    ]


def test_custom_emotions_and_warnings(tmp_path) -> None:
    emotions = ("Anger", "Joy")
    path = tmp_path / "s.csv"
    path.write_bytes(b"\xef\xbb\xbfFilename,Anger,Joy\r\n00000,0.1,0.2\r\n\r\n00007,0.3,0.4\r\n")
    report = check_submission(path, IDS[:2], emotions)
    assert report.ok, report.problems
    assert len(report.warnings) == 2
    assert "byte-order mark" in report.warnings[0] and "blank line" in report.warnings[1]
    assert not check_submission(path, IDS[:2]).ok  # the EMI header is expected by default


def test_empty_and_odd_files(tmp_path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert problems(empty) == ["the file is empty: no header, no rows"]
    header_only = submission(tmp_path / "h.csv", [])
    assert problems(header_only)[0] == "no data rows"
    latin = tmp_path / "latin.csv"
    latin.write_bytes(HEADER.encode() + b"\n00000,\xe9\n")
    assert problems(latin)[0].startswith("not valid UTF-8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_submission(tmp_path / "absent.csv", IDS)
    with pytest.raises(ValueError, match="repeats ids"):
        check_submission(header_only, ["00001", "00001"])


# --------------------------------------------------------------------------- command


def test_check_submission_command(tmp_path, capsys) -> None:
    ids = write_ids(tmp_path / "test_ids.csv")
    good = submission(tmp_path / "good.csv", rows(IDS))
    assert main(["check-submission", str(good), "--ids", str(ids)]) == 0
    out = capsys.readouterr().out
    assert "valid submission" in out and f"{len(IDS)} rows" in out

    bad = submission(tmp_path / "bad.csv", rows([str(int(i)) for i in IDS[:-1]]))
    assert main(["check-submission", str(bad), "--ids", str(ids), "--show", "2"]) == 1
    out = capsys.readouterr().out
    assert "NOT a valid submission" in out
    assert "'7' should be '00007'" in out and "... and 9 more" in out  # 11 lost zeros, 2 shown
    assert "test ids without a row (1): '00077'" in out

    two = tmp_path / "two.csv"
    two.write_text("Filename,Anger,Joy\n00000,0.1,0.2\n00007,0.3,0.4\n", encoding="utf-8")
    assert (
        main(
            [
                "check-submission",
                str(two),
                "--ids",
                str(write_ids(tmp_path / "i2.csv", IDS[:2])),
                "--emotions",
                "Anger,Joy",
            ]
        )
        == 0
    )
    capsys.readouterr()

    assert main(["check-submission", str(tmp_path / "absent.csv"), "--ids", str(ids)]) == 2
    assert "does not exist" in capsys.readouterr().err
