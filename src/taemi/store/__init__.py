"""The feature store: on-disk home of extracted per-clip features (format v1).

Extraction writes one record per clip (docs/method.md section 3: audio ``(T_a, D_a)``,
vision ``(T_v, D_v)``, text ``(D_t,)``, optional text token states ``(T_t, D_t)``, and a
missing flag per modality); training reads them back through memory maps, so a
paper-scale store (17,000 clips, about 30 GB in float16) is read with memory that does
not grow with the number of clips: only small per-clip index arrays live in RAM.

Layout::

    STORE/
      manifest.json        {"format": "taemi-feature-store", "version": 1,
                            "dtype": "float16" | "float32",
                            "dims": {"audio": D_a, "vision": D_v, "text": D_t},
                            "text_tokens": bool,
                            "modalities": {"audio": {"backbone": str, "settings": {...}},
                                           "vision": {...}, "text": {...}},
                            "shards": [{"name": "00000", "clips": n, "created": iso-time,
                                        "files": {"audio.bin": {"bytes": int, "sha256": hex},
                                                  ..., "index.npz": {...}}}, ...],
                            "taemi_version": str, "created": iso-time}
      shards/00000/audio.bin        all clips' audio rows, concatenated: (sum T_a, D_a)
      shards/00000/vision.bin       (sum T_v, D_v)
      shards/00000/text.bin         (n, D_t); a zero row for a clip whose text is missing
      shards/00000/text_tokens.bin  (sum T_t, D_t); only when the store has text tokens
      shards/00000/index.npz        ids (n,) unicode; audio_offset, audio_length,
                                    vision_offset, vision_length
                                    [, text_tokens_offset, text_tokens_length] (n,) int64
                                    in rows; missing (n, 3) bool (audio, vision, text).
                                    Saved and loaded with allow_pickle=False.
      .lock                         writer lock (fcntl.flock), present while a writer is
                                    open (a killed writer leaves it behind; harmless)
      waveforms/                    optional decoded audio for fine-tuning, written by
                                    ``taemi extract --waveforms`` (:mod:`taemi.store.waveforms`)
      transcripts/{id}.txt          the transcript of each clip, written by extraction
      extract_errors.jsonl          one JSON line per clip or rejected file, written by
                                    extraction and ``taemi import``
      extract_summary.json          counts and seconds per stage of the last extraction

``*.bin`` files are raw little-endian float16 (or float32, chosen at creation), C order,
no header. A missing audio/vision/text-token sequence has length 0 (no rows) and its
missing flag set; a present sequence has at least one row. Clip ``k`` of a shard has
text row ``k``.

Atomicity. A writer streams the clips of a shard into ``shards/.tmp-<random>/``; to
commit, it fsyncs every file, renames the directory to ``shards/<5-digit number>``,
fsyncs ``shards/``, writes ``manifest.json.tmp``, fsyncs it, ``os.replace``-s it onto
``manifest.json`` and fsyncs the root (POSIX ``rename(2)`` is atomic). A clip is visible
only once the manifest lists its shard, so a crash at any point leaves the previous
manifest intact plus, at most, a tmp or unlisted shard directory; readers ignore those
and the next writer deletes them. To resume an interrupted extraction, open a writer on
the same store and skip ids for which ``clip_id in writer`` is true.

A clip added again with ``replace=True`` goes into a later shard; readers see only the
newest version (the later shard wins). Shards never hold the same id twice.

Commit policy. A writer commits its pending clips as one shard when ``commit_clips`` are
pending (default ``shard_size``, 256) and, with ``commit_seconds``, at the first
:meth:`StoreWriter.commit_if_due` (called by the writer's user after each batch) once that
many seconds have passed since its last commit; so a killed writer loses at most that
much finished work plus one batch. ``taemi extract`` commits every 32 clips or 10 s.
Frequent commits make small shards; with ``compact=True`` a writer merges runs of
adjacent shards smaller than ``shard_size`` into shards of at most ``shard_size`` clips
(:meth:`StoreWriter.compact`): while writing, a run as soon as it is full (no further
commit would fit, or it has 8 shards), so that a long run never has more than a few
small shards and each clip is rewritten about once, while its data are still in the page
cache; on a normal close, every run left (its own, or those a killed writer left). So
readers keep few files open.
Compaction is crash-safe the same way: the merged shard is written under ``.tmp-``,
fsynced and renamed to a new number, the manifest is replaced (listing it instead of the
small shards, at their place in the shard order, so which version of a clip wins and the
order of ``FeatureStore.ids`` do not change), and only then are the small shards
deleted. A crash at any point leaves a readable store whose unlisted directories the
next writer deletes. The source files are checked against their manifest checksums
while they are merged; a shard that fails is left as it is (with a warning), so that
compaction never hides damage from :func:`verify_store`. A reader opened before a
compaction may find a shard gone: it raises a StoreError asking to reopen the store.

Reading checks values. :meth:`FeatureStore.get` raises a StoreError naming the store, the
shard and the clip when a clip holds NaN or Inf (a damaged file: a writer never stores
one), so training fails at the first bad clip instead of after an epoch of NaN losses.

The writer lock uses ``fcntl`` and is POSIX only; reading works everywhere numpy does.

Modules: :mod:`~taemi.store.format` (file names, manifest and index, the checks every
reader and writer shares), :mod:`~taemi.store.writer` (:class:`StoreWriter`),
:mod:`~taemi.store.reader` (:class:`FeatureStore`), :mod:`~taemi.store.info`
(``taemi store info`` / ``verify``), :mod:`~taemi.store.clip` (one clip's features),
:mod:`~taemi.store.waveforms` (the waveform cache) and :mod:`~taemi.store.merge`
(merging shard stores).
"""

from taemi.store.format import (
    ERRORS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    LOCK,
    MANIFEST,
    SHARDS,
    SUMMARY_FILE,
    TRANSCRIPTS,
    StoreError,
)
from taemi.store.info import format_info, store_info, verify_store
from taemi.store.reader import FeatureStore
from taemi.store.writer import StoreWriter, check_writable

__all__ = [
    "ERRORS_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX",
    "LOCK",
    "MANIFEST",
    "SHARDS",
    "SUMMARY_FILE",
    "TRANSCRIPTS",
    "FeatureStore",
    "StoreError",
    "StoreWriter",
    "check_writable",
    "format_info",
    "store_info",
    "verify_store",
]
