"""Label CSV reading and submission writing (taemi.data.labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taemi import EMI_EMOTIONS
from taemi.data.labels import LabelError, Labels, read_ids, read_labels, write_predictions

CREMA_D_LABELS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample" / "labels.csv"
)
CREMA_D_EMOTIONS = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad")

HEADER = "Filename," + ",".join(EMI_EMOTIONS)


def _write(tmp_path: Path, text: str, name: str = "labels.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding=encoding)
    return p


def _row(clip_id: str, *vals: object) -> str:
    vals = vals or (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    return ",".join([clip_id, *map(str, vals)])


def test_reads_ids_as_strings_keeping_leading_zeros(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "\n".join([HEADER, _row("00042"), _row("00007", 0, 1, 0.5, 0.25, 0, 1), ""])
    )
    labels = read_labels(p)
    assert labels.ids == ["00042", "00007"]
    assert labels.emotions == EMI_EMOTIONS
    assert labels.values.dtype == np.float32 and labels.values.shape == (2, 6)
    np.testing.assert_array_equal(labels.values[1], np.array([0, 1, 0.5, 0.25, 0, 1], np.float32))
    assert labels.source == str(p)
    assert len(labels) == 2


def test_bom_crlf_extra_columns_and_column_order(tmp_path: Path) -> None:
    text = "Extra,Joy,Filename,Amusement\r\nx,0.5,00001,0.25\r\ny,1,00002,0\r\n"
    p = _write(tmp_path, text, encoding="utf-8-sig")
    labels = read_labels(p, emotions=("Amusement", "Joy"))
    assert labels.ids == ["00001", "00002"]
    assert labels.emotions == ("Amusement", "Joy")
    np.testing.assert_array_equal(labels.values, np.array([[0.25, 0.5], [0, 1]], np.float32))


def test_emotions_none_takes_all_other_columns_from_header(tmp_path: Path) -> None:
    p = _write(tmp_path, "Anger,Filename,Calm\n0.1,a1,0.9\n0.2,a2,0.8\n")
    labels = read_labels(p, emotions=None)
    assert labels.emotions == ("Anger", "Calm")
    np.testing.assert_allclose(labels.values, [[0.1, 0.9], [0.2, 0.8]], rtol=1e-6)


def test_custom_id_column_and_no_range(tmp_path: Path) -> None:
    p = _write(tmp_path, "clip,valence\nc1,-3.5\nc2,7\n")
    labels = read_labels(p, emotions=("valence",), id_column="clip", value_range=None)
    np.testing.assert_array_equal(labels.values[:, 0], [-3.5, 7.0])


@pytest.mark.realmedia
def test_crema_d_sample_header_driven_names() -> None:
    if not CREMA_D_LABELS.is_file():
        pytest.skip(f"CREMA-D sample labels not found at {CREMA_D_LABELS}")
    labels = read_labels(CREMA_D_LABELS, emotions=CREMA_D_EMOTIONS)
    assert len(labels) == 12
    assert labels.emotions == CREMA_D_EMOTIONS
    assert "1001_DFA_ANG_XX" in labels.ids
    assert ((labels.values >= 0) & (labels.values <= 1)).all()
    # the ANG clip's strongest rated emotion is Anger
    row = labels.values[labels.ids.index("1001_DFA_ANG_XX")]
    assert CREMA_D_EMOTIONS[int(row.argmax())] == "Anger"
    # the default (EMI) names are not in this file: the error lists what is there
    with pytest.raises(LabelError, match="Admiration") as err:
        read_labels(CREMA_D_LABELS)
    assert "Anger" in str(err.value) and "labels.csv" in str(err.value)
    # emotions=None would also take the text columns, which are not numbers
    with pytest.raises(LabelError, match="'media'"):
        read_labels(CREMA_D_LABELS, emotions=None)


def test_subset_orders_and_rejects_unknown(tmp_path: Path) -> None:
    p = _write(tmp_path, "\n".join([HEADER, _row("00001", *[0.1] * 6), _row("00002", *[0.2] * 6)]))
    labels = read_labels(p)
    sub = labels.subset(["00002", "00001"])
    assert sub.ids == ["00002", "00001"]
    np.testing.assert_allclose(sub.values[:, 0], [0.2, 0.1], rtol=1e-6)
    with pytest.raises(KeyError, match="00003"):
        labels.subset(["00003"])


def test_labels_checks_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        Labels(ids=["a"], emotions=("x", "y"), values=np.zeros((1, 3), np.float32), source="t")


# ----------------------------------------------------------------- errors
ERROR_CASES = {
    "empty cell": ([HEADER, "00001,0.1,,0.3,0.4,0.5,0.6"], ["row 1", "Amusement", "empty"]),
    "non-numeric": (
        [HEADER, _row("00001"), "00002,0.1,0.2,abc,0.4,0.5,0.6"],
        ["row 2", "'abc'", "Determination"],
    ),
    "nan": ([HEADER, "00001,0.1,0.2,0.3,nan,0.5,0.6"], ["row 1", "'nan'", "Empathic Pain"]),
    "inf": ([HEADER, "00001,0.1,0.2,0.3,0.4,inf,0.6"], ["'inf'", "not finite"]),
    "out of range": ([HEADER, "00001,0.1,0.2,0.3,0.4,0.5,1.5"], ["'1.5'", "Joy", "outside"]),
    "negative": ([HEADER, "00009,-0.01,0.2,0.3,0.4,0.5,0.6"], ["'00009'", "'-0.01'"]),
    "duplicate id": (
        [HEADER, _row("00001"), _row("00002"), _row("00001")],
        ["row 3", "row 1", "'00001'", "duplicate"],
    ),
    "unsafe id": ([HEADER, _row("../etc")], ["row 1", "'../etc'"]),
    "empty id": ([HEADER, _row("")], ["row 1", "empty"]),
    "ragged short": ([HEADER, "00001,0.1,0.2"], ["row 1", "3 fields", "7"]),
    "ragged long": ([HEADER, _row("00001") + ",0.7"], ["row 1", "8 fields"]),
    "id column missing": (
        ["Clip," + ",".join(EMI_EMOTIONS), _row("00001")],
        ["'Filename'", "Clip"],
    ),
    "emotion missing": (
        ["Filename,Admiration,Joy", "00001,0.1,0.2"],
        ["'Amusement'", "'Empathic Pain'", "Admiration"],
    ),
    "duplicate column": ([HEADER + ",Joy", _row("00001") + ",0.1"], ["repeats", "Joy"]),
    "header only": ([HEADER], ["no data rows"]),
    "empty file": ([""], ["empty"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_cases_name_file_and_place(tmp_path: Path, case: str) -> None:
    lines, fragments = ERROR_CASES[case]
    p = _write(
        tmp_path,
        "\n".join(lines) + ("\n" if lines != [""] else ""),
        name=f"my_split_{case.replace(' ', '_')}.csv",
    )
    with pytest.raises(LabelError) as err:
        read_labels(p)
    msg = str(err.value)
    assert str(p) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_line_number_counts_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, "\n".join([HEADER, _row("00001"), "", "00002,x,0,0,0,0,0"]) + "\n")
    with pytest.raises(LabelError, match=r"row 2 \(line 4\)"):
        read_labels(p)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="nope.csv.*not found"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(LabelError, match="directory"):
        read_labels(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.csv"
    p.write_bytes((HEADER + "\n").encode() + b"caf\xe9,0,0,0,0,0,0\n")
    with pytest.raises(LabelError, match="latin.csv.*UTF-8"):
        read_labels(p)


def test_ids_absent_from_store(tmp_path: Path) -> None:
    lines = [HEADER] + [_row(f"{i:05d}") for i in range(10)]
    p = _write(tmp_path, "\n".join(lines))
    store = {f"{i:05d}" for i in range(3)}
    with pytest.raises(LabelError) as err:
        read_labels(p, store_ids=store)
    msg = str(err.value)
    assert str(p) in msg and "7 of 10" in msg and "'00003' (row 4)" in msg
    assert "'00009'" not in msg  # only the first few are listed
    assert len(read_labels(p, store_ids={f"{i:05d}" for i in range(10)})) == 10


def test_bad_arguments(tmp_path: Path) -> None:
    p = _write(tmp_path, "\n".join([HEADER, _row("00001")]))
    with pytest.raises(ValueError, match="repeat"):
        read_labels(p, emotions=("Joy", "Joy"))
    with pytest.raises(TypeError, match="string"):
        read_labels(p, emotions="Joy")
    with pytest.raises(LabelError, match="also requested"):
        read_labels(p, emotions=("Filename",))


# ---------------------------------------------------------- predictions
def test_write_predictions_sorted_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = ["00010", "00002", "00100", "00001"]
    values = rng.random((4, 6)).astype(np.float32)
    out = tmp_path / "sub" / "predictions.csv"
    write_predictions(out, ids, EMI_EMOTIONS, values)
    text = out.read_text().splitlines()
    assert text[0] == HEADER
    assert [line.split(",")[0] for line in text[1:]] == ["00001", "00002", "00010", "00100"]
    back = read_labels(out)
    order = np.argsort(ids)
    np.testing.assert_array_equal(back.values, values[order])  # exact round trip
    assert not list(out.parent.glob(".*tmp*"))


def test_write_predictions_float64_exact(tmp_path: Path) -> None:
    values = np.array([[1 / 3, 0.1 + 0.2, 1e-9, 0.0, 1.0, 0.123456789012345]])
    out = tmp_path / "p.csv"
    write_predictions(out, ["00001"], EMI_EMOTIONS, values)
    row = out.read_text().splitlines()[1].split(",")[1:]
    assert [float(x) for x in row] == values[0].tolist()
    assert "e" not in ",".join(row)  # positional, no exponent


def test_write_predictions_clip(tmp_path: Path) -> None:
    values = np.array([[-0.5, 1.5, 0.5, -0.0, 2.0, 0.25]], dtype=np.float32)
    out = tmp_path / "p.csv"
    write_predictions(out, ["00001"], EMI_EMOTIONS, values)  # raw: written as given
    with pytest.raises(LabelError, match="outside"):
        read_labels(out)
    write_predictions(out, ["00001"], EMI_EMOTIONS, values, clip=True)
    assert out.read_text().splitlines()[1] == "00001,0.0,1.0,0.5,0.0,1.0,0.25"
    np.testing.assert_array_equal(read_labels(out).values, [[0, 1, 0.5, 0, 1, 0.25]])


def test_write_predictions_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    ok = np.zeros((2, 6), np.float32)
    bad = ok.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite.*'00002'.*Empathic Pain"):
        write_predictions(out, ["00001", "00002"], EMI_EMOTIONS, bad)
    assert not out.exists()
    with pytest.raises(ValueError, match="shape"):
        write_predictions(out, ["00001"], EMI_EMOTIONS, ok)
    with pytest.raises(ValueError, match="repeated"):
        write_predictions(out, ["00001", "00001"], EMI_EMOTIONS, ok)
    with pytest.raises(ValueError, match="path separator"):
        write_predictions(out, ["a/b", "00001"], EMI_EMOTIONS, ok)
    assert not list(tmp_path.iterdir())


def test_write_predictions_replaces_existing(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    write_predictions(out, ["00001"], ("a",), np.array([[0.5]]))
    write_predictions(out, ["00002"], ("a",), np.array([[0.25]]))
    back = read_labels(out, emotions=("a",))
    assert back.ids == ["00002"] and back.values[0, 0] == 0.25


def test_check_scorable_needs_two_clips(tmp_path: Path) -> None:
    """Pearson r needs two clips: one is refused naming the file, two pass."""
    one = read_labels(_write(tmp_path, "\n".join([HEADER, _row("00042"), ""]), name="one.csv"))
    with pytest.raises(LabelError, match=r"one\.csv: 1 validation clip\(s\); .* at least 2"):
        one.check_scorable("validation")
    two = read_labels(
        _write(tmp_path, "\n".join([HEADER, _row("a"), _row("b"), ""]), name="two.csv")
    )
    assert two.check_scorable("validation") is two


def test_read_ids_errors(tmp_path: Path) -> None:
    p = tmp_path / "x_split.csv"
    p.write_text("Filename\n00042\n00042\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x_split.csv row 2.*duplicate id '00042'"):
        read_ids(p)
    p.write_text("Name\n1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'Filename' column"):
        read_ids(p)
    p.write_bytes(b"\xef\xbb\xbfFilename,Joy\n00042,0.5\n")  # BOM tolerated
    assert read_ids(p) == ["00042"]
    with pytest.raises(FileNotFoundError, match="split file"):
        read_ids(tmp_path / "missing.csv", what="split file")
    p.write_text("Filename\n", encoding="utf-8")
    assert read_ids(p) == []
    with pytest.raises(ValueError, match="no ids"):
        read_ids(p, allow_empty=False)
