"""Import the ABAW EMI organisers' pre-extracted features into a feature store.

The organisers ship per-clip features (docs/method.md section 2)::

    ROOT/wav2vec2/{id}.pkl    audio, an array (T_a, D_a)
    ROOT/vit/{id}.pkl         vision, an array (T_v, D_v)
    ROOT/text/{id}.txt        the transcript (encoded here by a text encoder)

:func:`import_organiser_features` writes them to a :mod:`taemi.store` feature store,
so that training runs on them exactly as on features extracted by ``taemi extract``.

Feature files are read by :func:`taemi.extract.feature_files.load_feature_pickle`, which
never runs code from a pickle and refuses arrays above a size limit before allocating
them (see that module).

Feature sizes. A new store's audio and vision sizes D are decided by agreement: up to
:data:`DIM_SAMPLE` files of the modality, spread over the id order, are read, and the
size held by more than half of the readable ones wins (the decision and the count are
logged); without such a majority the import stops with an error asking for the size.
``dims={"audio": D}`` (``taemi import --dims audio=D``) gives it instead. An existing
store's sizes rule (a given size that differs is an error).

Rejected files and missing modalities. A clip's modality is missing (and the clip is
written) when its file is absent, or its transcript is empty. A file that is present but
cannot be used (unreadable, unsafe, too large, of another feature size D than the store,
out of the store dtype's range), and a transcript the text encoder fails on, are
rejected: the clip is not written at all, and each rejected file is recorded in the
store's error file (:data:`taemi.store.ERRORS_FILE`, one JSON line each, as
``taemi extract`` records its failures) and logged as a warning. A failed clip is not in
the store, so the next run retries it: fix or replace the file and run the same command
again (clips already in the store are skipped). A file whose name is not a valid clip id
is rejected the same way. :attr:`ImportSummary.failed` counts the clips not written,
:attr:`ImportSummary.rejected` the rejected files; ``taemi import`` exits with status 1
when there are any.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from taemi import MODALITIES
from taemi.backbones.base import TextEncoder
from taemi.extract.feature_files import load_feature_pickle
from taemi.store import ERRORS_FILE, MANIFEST, TRANSCRIPTS, FeatureStore, StoreWriter
from taemi.store.clip import ClipFeatures, check_clip_id

__all__ = ["ImportSummary", "import_organiser_features", "summary_line"]

log = logging.getLogger(__name__)

#: Feature file extensions looked for in the audio and vision folders (``.pkl`` first).
FEATURE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".npy")
REPORT_FILE = "import_report.json"
#: Feature size of a modality that is not imported (missing for every clip): the paper's
#: (docs/method.md section 3), so the store fits the paper model; override with ``dims={m: D}``.
DEFAULT_DIMS = {"audio": 1027, "vision": 768, "text": 768}
#: Files read per modality to decide a new store's feature size (spread over the ids).
DIM_SAMPLE = 32

# --------------------------------------------------------------------------- import


@dataclass
class ImportSummary:
    """What an import did; also written to ``STORE/import_report.json``."""

    store: str
    root: str
    text_encoder: str  # its name, or "none"
    total: int = 0  # ids considered
    done: int = 0  # clips written by this run
    skipped: int = 0  # already in the store (resumed)
    failed: int = 0  # ids not written: a rejected file, an invalid id, the store refused it
    rejected: int = 0  # files rejected (present but unusable); each is in ``errors``
    missing: dict[str, int] = field(
        default_factory=lambda: {m: 0 for m in MODALITIES}
    )  # among done
    dims: dict[str, int] = field(default_factory=dict)  # the store's feature sizes
    # this run's failures, as written to STORE/extract_errors.jsonl:
    # {clip_id, path, stage ("input", "read", "encode", "write"), modality, reason, time}
    errors: list[dict] = field(default_factory=list)
    # {clip_id, modality, path}: absent files (that modality missing), for every clip in the
    # store: the earlier runs' of the clips this run skipped, then this run's
    absent: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    report_file: str | None = None
    errors_file: str | None = None  # set when this run had errors
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when no file was rejected and no clip failed."""
        return not self.errors


def _error(
    clip_id: str | None, modality: str | None, path: Path | None, stage: str, reason: str
) -> dict:
    """One error record, shaped like ``taemi extract``'s (plus ``modality``)."""
    return {
        "clip_id": clip_id,
        "path": None if path is None else str(path),
        "stage": stage,
        "modality": modality,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _reject(
    errors: list[dict],
    clip_id: str | None,
    modality: str | None,
    path: Path | None,
    stage: str,
    reason: str,
) -> None:
    """Record a rejected file (or a failed step) and say so, one warning line."""
    errors.append(_error(clip_id, modality, path, stage, reason))
    log.warning("rejected: clip %s %s: %s", clip_id, modality or "", reason)


def _index_folder(
    folder: Path, suffixes: tuple[str, ...], modality: str, errors: list[dict]
) -> dict[str, Path]:
    """Files of ``folder`` by stem (the earlier suffix of ``suffixes`` wins a shared stem)."""
    index: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in suffixes or not p.is_file():
            continue
        try:
            clip_id = check_clip_id(p.stem, source=str(p))
        except ValueError as e:
            _reject(errors, None, modality, p, "input", str(e))
            continue
        old = index.get(clip_id)
        if old is not None:
            keep = min(old, p, key=lambda q: suffixes.index(q.suffix.lower()))
            log.warning(
                "%s: clip %s has %s and %s; using %s", folder, clip_id, old.name, p.name, keep.name
            )
            p = keep
        index[clip_id] = p
    return index


def _folder(root: Path, name: str | os.PathLike[str] | None, what: str) -> Path | None:
    if name is None:
        return None
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} does not exist (pass None / 'none' to import without {what})"
        )
    return folder


def _agreed_dim(m: str, index: dict[str, Path], folder: Path) -> int:
    """The feature size D of most of the files of ``index`` (a sample of DIM_SAMPLE spread
    over the id order): the size more than half of the readable files read have."""
    ids = sorted(index)
    if len(ids) > DIM_SAMPLE:
        ids = [ids[round(k * (len(ids) - 1) / (DIM_SAMPLE - 1))] for k in range(DIM_SAMPLE)]
    counts: Counter[int] = Counter()
    unreadable = 0
    for clip_id in ids:
        try:
            counts[int(load_feature_pickle(index[clip_id]).shape[1])] += 1
        except (ValueError, OSError):
            unreadable += 1
    readable = sum(counts.values())
    ask = f"pass --dims {m}=D (in Python: dims={{'{m}': D}}) to create the store"
    if not readable:
        raise ValueError(
            f"cannot tell the {m} feature size: none of the {len(ids)} {m} feature "
            f"files read in {folder} is readable; {ask}"
        )
    seen = ", ".join(f"D = {d}: {n}" for d, n in counts.most_common())
    seen += f", unreadable: {unreadable}" if unreadable else ""
    d, n = counts.most_common(1)[0]
    if 2 * n <= readable:
        raise ValueError(
            f"cannot tell the {m} feature size: the {len(ids)} {m} feature files read in "
            f"{folder} disagree ({seen}), and no size is held by more than half of the "
            f"readable ones; {ask}"
        )
    log.info(
        "%s feature size D = %d: %d of the %d files read agree (%s; %d files in %s)",
        m,
        d,
        n,
        len(ids),
        seen,
        len(index),
        folder,
    )
    return d


def _provenance(
    folders: dict[str, Path | None], text_encoder: TextEncoder | None, text_dir: Path | None
) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in ("audio", "vision"):
        folder = folders[m]
        out[m] = (
            {"backbone": f"organiser:{folder.name}", "settings": {"source": str(folder)}}
            if folder is not None
            else {
                "backbone": "none",
                "settings": {"note": f"not imported: {m} missing for every clip"},
            }
        )
    transcripts = None if text_dir is None else str(text_dir)
    if text_encoder is None or text_dir is None:
        why = "no text encoder" if text_encoder is None else "no transcripts"
        out["text"] = {
            "backbone": "none",
            "settings": {"transcripts": transcripts, "note": f"{why}: text missing for every clip"},
        }
    else:
        out["text"] = {
            "backbone": text_encoder.name,
            "settings": {**text_encoder.settings, "transcripts": transcripts},
        }
    return out


def _check_given_dims(given: Mapping[str, Any]) -> dict[str, int]:
    unknown = set(given) - set(MODALITIES)
    if unknown:
        raise ValueError(
            f"dims has unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}"
        )
    for m, d in given.items():
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"dims[{m!r}] = {d!r}; expected a positive int")
    return {m: int(d) for m, d in given.items()}


def _resolve_dims(
    store: Path,
    given: dict[str, int],
    indexes: dict[str, dict[str, Path]],
    folders: dict[str, Path | None],
    text_encoder: TextEncoder | None,
) -> dict[str, int] | None:
    """Dims for a new store (None when the store exists: its own dims are used)."""
    if text_encoder is not None and given.get("text", text_encoder.dim) != text_encoder.dim:
        raise ValueError(
            f"dims gives text = {given['text']}, but the text encoder "
            f"{text_encoder.name} gives {text_encoder.dim}-d vectors"
        )
    if (store / MANIFEST).exists():
        have = FeatureStore(store).dims
        differ = {m: d for m, d in given.items() if have[m] != d}
        if differ:
            raise ValueError(f"the store {store} has feature sizes {have}; dims gives {differ}")
        return None
    dims: dict[str, int] = {}
    for m in ("audio", "vision"):
        folder = folders[m]
        if m in given:
            dims[m] = given[m]
            if folder is not None:
                log.info("%s feature size D = %d (given)", m, dims[m])
        elif folder is None:
            dims[m] = DEFAULT_DIMS[m]
        elif not indexes[m]:
            raise ValueError(
                f"cannot tell the {m} feature size: no {m} feature file in {folder}; "
                f"pass --dims {m}=D (in Python: dims={{'{m}': D}}) to create the store"
            )
        else:
            dims[m] = _agreed_dim(m, indexes[m], folder)
    dims["text"] = (
        text_encoder.dim if text_encoder is not None else given.get("text", DEFAULT_DIMS["text"])
    )
    return dims


def import_organiser_features(
    root: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    text_encoder: TextEncoder | None,
    audio_dir: str | os.PathLike[str] | None = "wav2vec2",
    vision_dir: str | os.PathLike[str] | None = "vit",
    text_dir: str | os.PathLike[str] | None = "text",
    ids: Iterable[str] | None = None,
    dims: Mapping[str, int] | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> ImportSummary:
    """Write the organisers' features under ``root`` into the feature store ``store``.

    Args:
        root: folder holding ``audio_dir``, ``vision_dir`` and ``text_dir``.
        store: feature store folder; created, or extended (clips already in it are
            skipped, so an interrupted import resumes where it stopped, and a clip that
            failed is retried).
        text_encoder: encodes each transcript into the text vector (the offline MiniLM,
            the paper's GTE, ...); ``None`` imports no text (text missing for every clip,
            recorded in the store's provenance).
        audio_dir, vision_dir, text_dir: folders under ``root`` (or absolute paths); a
            folder given must exist; ``None`` leaves that modality missing for every clip.
        ids: the clips to import, in order; ``None``: every id with a file in any folder.
        dims: feature sizes for a new store, instead of the size most files agree on (see
            the module docstring); for a modality not imported the default is
            :data:`DEFAULT_DIMS` (the paper's). A file of another size is rejected. For an
            existing store they must equal its sizes. The text size is the encoder's.
        dtype: store dtype for a new store ("float16", the default, or "float32").
        batch_size: transcripts per text-encoder call.
        progress: show a progress bar.

    A clip whose files are all usable is written, with a modality missing where its file
    is absent (or its transcript empty); a clip with a rejected file is not written (see
    the module docstring). Every rejected file is in ``STORE/extract_errors.jsonl``. A
    clip with every file absent is still written: predictions need a row for every id.
    """
    t0 = time.perf_counter()
    root = Path(root).resolve()
    store = Path(store)
    if not root.is_dir():
        raise FileNotFoundError(f"organiser feature root {root} does not exist or is not a folder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(ids, str):
        raise TypeError(f"ids must be a list of clip ids, got the string {ids!r}")
    given = _check_given_dims(dims or {})
    folders = {
        "audio": _folder(root, audio_dir, "audio"),
        "vision": _folder(root, vision_dir, "vision"),
        "text": _folder(root, text_dir, "text"),
    }
    summary = ImportSummary(
        store=str(store),
        root=str(root),
        text_encoder="none" if text_encoder is None else text_encoder.name,
    )
    if text_encoder is None:
        log.info("no text encoder: text is missing for every clip (transcripts are not read)")
    indexes: dict[str, dict[str, Path]] = {}
    for m in MODALITIES:
        folder = folders[m]
        suffixes = (".txt",) if m == "text" else FEATURE_SUFFIXES
        indexes[m] = {} if folder is None else _index_folder(folder, suffixes, m, summary.errors)
    wanted = sorted(set().union(*indexes.values())) if ids is None else list(ids)
    summary.total = len(wanted)
    if not wanted:
        raise FileNotFoundError(
            f"no clips to import: no feature files in {', '.join(str(f) for f in folders.values() if f)}"
        )
    new_dims = _resolve_dims(store, given, indexes, folders, text_encoder)
    modalities = _provenance(folders, text_encoder, folders["text"])
    opened, written = False, set()  # written: ids this run added to the store
    try:
        with StoreWriter(
            store,
            dims=new_dims,
            dtype=dtype,
            text_tokens=False if new_dims else None,
            modalities=modalities,
        ) as writer:
            if writer.text_tokens:
                raise ValueError(
                    f"the store {store} keeps text token states; organiser features have none"
                )
            if text_encoder is not None and writer.dims["text"] != text_encoder.dim:
                raise ValueError(
                    f"text encoder {text_encoder.name} gives {text_encoder.dim}-d vectors, the store "
                    f"{store} holds {writer.dims['text']}-d text"
                )
            summary.dims = writer.dims
            (store / TRANSCRIPTS).mkdir(exist_ok=True)
            todo = _checked_ids(wanted, writer, summary)
            opened = True
            _import(
                todo, writer, indexes, folders, text_encoder, batch_size, summary, progress, written
            )
    except BaseException:
        summary.interrupted = True
        raise
    finally:  # also after a crash or Ctrl-C, once the store could be opened
        summary.wall_seconds = time.perf_counter() - t0
        summary.rejected = sum(e["path"] is not None for e in summary.errors)  # those naming a file
        if opened:
            _report(store, summary, written)
    return summary


def _checked_ids(wanted: list[str], writer: StoreWriter, summary: ImportSummary) -> list[str]:
    """Valid, first-seen ids not yet in the store (the others are counted and reported)."""
    todo: list[str] = []
    seen: set[str] = set()
    for raw in wanted:
        try:
            clip_id = check_clip_id(raw, source="ids")
        except ValueError as e:
            _reject(summary.errors, None, None, None, "input", str(e))
            summary.failed += 1
            continue
        if clip_id in seen:
            _reject(
                summary.errors, clip_id, None, None, "input", f"clip id {clip_id!r} is listed twice"
            )
            summary.failed += 1
            continue
        seen.add(clip_id)
        if clip_id in writer:
            summary.skipped += 1
        else:
            todo.append(clip_id)
    if summary.skipped:
        log.info(
            "%d of %d clips are already in %s: skipped", summary.skipped, len(wanted), writer.root
        )
    return todo


def _load_sequence(
    clip_id: str,
    m: str,
    index: dict[str, Path],
    folder: Path | None,
    dim: int,
    limit: float,
    absent: list[dict],
    errors: list[dict],
) -> np.ndarray | None:
    """A clip's (T, D) features of modality ``m``, or None: not imported, absent (noted
    in ``absent``) or rejected (recorded in ``errors``)."""
    if folder is None:
        return None
    path = index.get(clip_id)
    if path is None:
        absent.append({"clip_id": clip_id, "modality": m, "path": str(folder / f"{clip_id}.pkl")})
        return None
    try:
        arr = load_feature_pickle(path)  # (T, D)
    except (ValueError, OSError) as e:
        _reject(errors, clip_id, m, path, "read", str(e))
        return None
    if arr.shape[1] != dim:
        _reject(
            errors,
            clip_id,
            m,
            path,
            "read",
            f"{path}: shape {arr.shape}: D = {arr.shape[1]}, the store has {m} D = {dim}",
        )
        return None
    peak = float(np.abs(arr).max())
    if peak > limit:
        _reject(
            errors,
            clip_id,
            m,
            path,
            "read",
            f"{path}: max |x| = {peak:g} does not fit the store's "
            f"dtype (largest {limit:g}); import into a float32 store",
        )
        return None
    return arr


def _read_transcript(
    clip_id: str, index: dict[str, Path], folder: Path, absent: list[dict], errors: list[dict]
) -> str | None:
    """The transcript text ('' when empty), or None: absent (noted) or unreadable (rejected)."""
    path = index.get(clip_id)
    if path is None:
        absent.append(
            {"clip_id": clip_id, "modality": "text", "path": str(folder / f"{clip_id}.txt")}
        )
        return None
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        _reject(
            errors,
            clip_id,
            "text",
            path,
            "read",
            f"{path}: unreadable transcript: {type(e).__name__}: {e}",
        )
        return None


def _encode_texts(
    encoder: TextEncoder, texts: list[str], ids: list[str], folder: Path, errors: list[dict]
) -> list[np.ndarray | None]:
    """(D_t,) vectors of ``texts``; a batch that fails is retried text by text."""
    try:
        vecs, _ = encoder.encode(texts)  # (N, D_t)
        return list(vecs)
    except (ValueError, RuntimeError) as e:
        if len(texts) == 1:
            _reject(
                errors,
                ids[0],
                "text",
                folder / f"{ids[0]}.txt",
                "encode",
                f"text encoder failed: {type(e).__name__}: {e}",
            )
            return [None]
        log.warning(
            "a batch of %d transcripts failed to encode (%s); retrying one by one", len(texts), e
        )
        return [
            v for t, i in zip(texts, ids) for v in _encode_texts(encoder, [t], [i], folder, errors)
        ]


def _import(
    todo: list[str],
    writer: StoreWriter,
    indexes: dict[str, dict[str, Path]],
    folders: dict[str, Path | None],
    text_encoder: TextEncoder | None,
    batch_size: int,
    summary: ImportSummary,
    progress: bool,
    written: set[str],
) -> None:
    dims = writer.dims
    limit = float(np.finfo(writer.dtype).max)  # largest value the store dtype holds
    transcripts_dir = writer.root / TRANSCRIPTS
    text_dir = folders["text"] if text_encoder is not None else None
    bar = tqdm(
        total=len(todo), desc="import", unit="clip", disable=not progress, dynamic_ncols=True
    )
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        errors: dict[str, list[dict]] = {c: [] for c in chunk}  # this chunk's, by clip
        absent: dict[str, list[dict]] = {c: [] for c in chunk}
        texts: list[str | None] = [None] * len(chunk)
        vecs: list[np.ndarray | None] = [None] * len(chunk)
        if text_encoder is not None and text_dir is not None:
            texts = [
                _read_transcript(c, indexes["text"], text_dir, absent[c], errors[c]) for c in chunk
            ]
            present = [k for k, t in enumerate(texts) if t]  # empty transcript: text missing
            failures: list[dict] = []
            encoded = (
                _encode_texts(
                    text_encoder,
                    [str(texts[k]) for k in present],
                    [chunk[k] for k in present],
                    text_dir,
                    failures,
                )
                if present
                else []
            )
            for e in failures:
                errors[e["clip_id"]].append(e)
            for k, v in zip(present, encoded):
                vecs[k] = v  # (D_t,)
        for k, clip_id in enumerate(chunk):
            # one clip's arrays at a time: at most two arrays at the size limit in memory
            seqs = {
                m: _load_sequence(
                    clip_id,
                    m,
                    indexes[m],
                    folders[m],
                    dims[m],
                    limit,
                    absent[clip_id],
                    errors[clip_id],
                )
                for m in ("audio", "vision")
            }
            if errors[clip_id]:  # a rejected file: not written, so the next run retries it
                summary.errors.extend(errors[clip_id])
                summary.failed += 1
                continue
            clip = ClipFeatures(clip_id, seqs["audio"], seqs["vision"], vecs[k])
            try:
                writer.add(clip)
            except ValueError as e:  # not expected: every array was checked above
                _reject(summary.errors, clip_id, None, None, "write", f"not written: {e}")
                summary.failed += 1
                continue
            text = texts[k]
            if text is not None:
                tmp = transcripts_dir / f"{clip_id}.txt.tmp"
                tmp.write_text(text + "\n", encoding="utf-8")
                os.replace(tmp, transcripts_dir / f"{clip_id}.txt")
            summary.done += 1
            summary.absent.extend(absent[clip_id])
            written.add(clip_id)
            for m, miss in zip(MODALITIES, clip.missing):
                summary.missing[m] += int(miss)
        bar.update(len(chunk))
        bar.set_postfix(failed=summary.failed)
    bar.close()


def _report(store: Path, summary: ImportSummary, written: set[str]) -> None:
    """Append this run's errors to ``STORE/extract_errors.jsonl`` and write
    ``STORE/import_report.json``: this run, plus the earlier runs' absent files of the clips
    in the store that this run did not write (so the report covers every clip)."""
    path = store / REPORT_FILE
    earlier: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            keep = set(FeatureStore(store).ids) - written
            earlier = [a for a in old.get("absent", []) if a.get("clip_id") in keep]
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s: earlier report unreadable (%s); it is replaced", path, e)
    if summary.errors:
        errors_file = store / ERRORS_FILE
        with open(errors_file, "a", encoding="utf-8") as fh:
            fh.writelines(
                json.dumps({**e, "run": summary.started}, ensure_ascii=True) + "\n"
                for e in summary.errors
            )
        summary.errors_file = str(errors_file)
    for m, n in sorted(Counter(a["modality"] for a in summary.absent).items()):
        log.info("%d clip(s) have no %s file: %s is missing for them (listed in %s)", n, m, m, path)
    summary.absent[:0] = earlier
    summary.report_file = str(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def summary_line(summary: ImportSummary) -> str:
    """One line of counts, for the CLI."""
    miss = summary.missing
    return (
        f"{summary.done} imported, {summary.skipped} skipped, {summary.failed} failed, "
        f"{summary.rejected} file(s) rejected; missing: audio {miss['audio']}, vision "
        f"{miss['vision']}, text {miss['text']}; {summary.wall_seconds:.1f} s"
    )
