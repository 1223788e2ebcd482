"""Receiving a request's media: multipart/form-data streamed to a private folder.

The body is parsed while it arrives (python-multipart's streaming parser), each part of
the field ``file`` written straight to its own file, so memory holds one chunk at a time
and a body over the size limit is refused as soon as the limit is passed: reading stops
there (413). The files get names made by the server, ``{clip id}{suffix}``: only a
sanitised suffix of the client's file name is kept (so that FFmpeg can use the container
hint); the client's name is never part of a path, it is only echoed back for display.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from taemi.serve.errors import ApiError

__all__ = ["FIELD", "MAX_FILES", "Upload", "receive_uploads", "safe_suffix"]

#: The multipart field that carries media files (repeat it for several files).
FIELD = "file"
#: Files accepted in one request.
MAX_FILES = 64
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,10}$")
_MAX_NAME = 255  # characters of a client file name echoed back


@dataclass
class Upload:
    """One received file."""

    index: int  # its position in the request, from 0
    filename: str  # the client's file name: for display only, never a path
    clip_id: str  # made by the server; the file's stem and the clip's id in the response
    path: Path  # where it was written (inside the request's private folder)
    size: int = 0  # bytes


def safe_suffix(filename: str) -> str:
    """The lower-cased extension of ``filename`` when it is 1-10 ASCII letters or digits
    (``.mp4``), else ``""``: nothing else of a client's name reaches the file system."""
    name = filename.replace("\\", "/")
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if _SUFFIX.match(suffix) else ""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _display_name(raw: bytes | None, index: int) -> str:
    if not raw:
        return f"upload {index + 1}"
    name = raw.decode("utf-8", errors="replace")  # browsers send UTF-8 bytes
    name = "".join(c for c in name if c.isprintable())[:_MAX_NAME]
    return name or f"upload {index + 1}"


class _Receiver:
    """python-multipart callbacks: one file per part of the field ``file``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uploads: list[Upload] = []
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._fd: int | None = None
        self.current: str | None = None  # the file being received (messages)

    # header parsing
    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        disposition, params = parse_options_header(
            self._headers.get(b"content-disposition", b"").decode("latin-1")
        )
        name = params.get(b"name", b"").decode("latin-1")
        if disposition != b"form-data" or name != FIELD:
            raise ApiError(
                422,
                "wrong_field",
                f"unexpected form field {name!r}: send each media file in the multipart "
                f"field {FIELD!r} (repeat it for several files)",
            )
        index = len(self.uploads)
        if index >= MAX_FILES:
            raise ApiError(
                422, "too_many_files", f"more than {MAX_FILES} files in one request; split it"
            )
        filename = _display_name(params.get(b"filename"), index)
        clip_id = f"c{index:02d}-{secrets.token_hex(6)}"
        path = self.folder / f"{clip_id}{safe_suffix(filename)}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.uploads.append(Upload(index, filename, clip_id, path))
        self.current = filename

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        view = memoryview(data)[start:end]
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.uploads[-1].size += end - start

    def on_part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


async def receive_uploads(
    headers: dict[str, str] | object,
    stream: AsyncIterator[bytes],
    folder: Path,
    *,
    max_bytes: int,
) -> list[Upload]:
    """Write the ``file`` parts of a multipart body into ``folder``; returns them in order.

    ``headers``: the request's headers (a mapping); ``stream``: its body chunks. Raises
    :class:`ApiError`: 413 when the body passes ``max_bytes`` (declared or while reading:
    reading stops there), 422 when the body is not multipart/form-data, has another field
    than ``file``, no file at all, or is malformed."""
    ctype_header = headers.get("content-type", "")
    ctype, params = parse_options_header(ctype_header)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(
            422,
            "not_multipart",
            f"the request body is {ctype_header or 'without a Content-Type'}; send "
            f"multipart/form-data with the media in the field {FIELD!r} "
            f"(curl -F {FIELD}=@clip.mp4)",
        )
    limit = _size(max_bytes)
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413,
            "upload_too_large",
            f"the upload is {_size(int(declared))}, over the server's limit of {limit} "
            "per request (taemi serve --max-upload-mb); nothing was read",
        )
    receiver = _Receiver(folder)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in stream:
            if received + len(chunk) > max_bytes:
                parser.write(chunk[: max_bytes - received])  # up to the limit: names the file
                which = f" (at {receiver.current!r})" if receiver.current else ""
                raise ApiError(
                    413,
                    "upload_too_large",
                    f"the upload{which} is over the server's limit of {limit} per request "
                    "(taemi serve --max-upload-mb); reading stopped there",
                )
            received += len(chunk)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(422, "bad_multipart", f"the multipart body is malformed: {e}") from None
    finally:
        receiver.close()
    if not receiver.uploads:
        raise ApiError(
            422,
            "missing_file",
            f"no file in the request: send the media in the multipart field {FIELD!r}",
        )
    return receiver.uploads
