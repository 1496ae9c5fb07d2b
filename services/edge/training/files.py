"""OpenAI's Files API for training data: ``/v1/files`` upload, list, retrieve, content, delete.

An upload is streamed to a temporary file (bounded by ``EdgeConfig.max_upload_bytes``, not by
the JSON body limit) and from there into the object store, so a large dataset never sits in
the edge's memory. Purposes ``fine-tune`` (files to train on) and ``batch`` (a batch's input,
checked line by line before it is stored: ``batch.lines``) are accepted.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import BinaryIO

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from schemas.errors import BusError, ErrorCode
from services.common.artifacts import FileMeta
from services.edge.batch import lines as batch_lines
from services.edge.state import CONFIG
from services.edge.training.bodies import file_object, page, page_params
from services.edge.training.jobs import owner_of, store_of
from services.edge.training.translate import new_file_id

PURPOSES = ("fine-tune", "batch")
_COPY_CHUNK = 1 << 20
_MAX_FIELD = 4096  # bytes of a form field other than the file
_MULTIPART_SLACK = 64 << 10  # headers and boundaries around the file in the body
_encode = msgspec.json.Encoder().encode


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _invalid(message: str, param: str | None) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _too_large(limit: int) -> BusError:
    return BusError(ErrorCode.REQUEST_TOO_LARGE, f"the file is larger than this edge accepts ({limit} bytes; "
                    "see --max-upload-bytes)", param="file")


def _check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise _invalid(f"'purpose' must be one of: {', '.join(PURPOSES)}; got {purpose!r}", "purpose")
    return purpose


async def _field_text(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(1024):
        data += chunk
        if len(data) > _MAX_FIELD:
            raise _invalid(f"form field '{name}' is longer than {_MAX_FIELD} bytes", name)
    return data.decode("utf-8", errors="replace").strip()


async def _spool(part: BodyPartReader, sink: BinaryIO, limit: int) -> int:
    """Copy a file part into ``sink`` (writes off the event loop, 1 MiB at a time); its size."""
    size = 0
    pending = bytearray()
    while chunk := await part.read_chunk(256 << 10):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        pending += chunk
        if len(pending) >= _COPY_CHUNK:
            await asyncio.to_thread(sink.write, bytes(pending))
            pending.clear()
    if pending:
        await asyncio.to_thread(sink.write, bytes(pending))
    await asyncio.to_thread(sink.seek, 0)
    return size


async def upload_file(request: web.Request) -> web.Response:
    """``POST /v1/files`` (multipart ``file`` and ``purpose``): store a training file, answer its file object."""
    limit = request.app[CONFIG].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + _MULTIPART_SLACK:
        raise _too_large(limit)
    if not request.content_type.startswith("multipart/"):
        raise _invalid("upload the file as multipart/form-data with fields 'file' and 'purpose'", "file")
    sink = await asyncio.to_thread(tempfile.TemporaryFile)
    try:
        try:
            purpose, filename, size = await _read_form(await request.multipart(), sink, limit)
        except (HttpProcessingError, ValueError, UnicodeDecodeError) as exc:  # a malformed form is the client's
            raise _invalid(f"malformed multipart/form-data body: {getattr(exc, 'message', None) or exc}",
                           "file") from None
        _check_purpose(purpose)
        if size < 0:
            raise _invalid("the form has no 'file' field", "file")
        if size == 0:
            raise _invalid("the file is empty", "file")
        if purpose == "batch":
            await asyncio.to_thread(_check_batch_file, sink)
        meta = FileMeta(id=new_file_id(), filename=filename, purpose=purpose, bytes=size,
                        created_at=int(time.time()), owner=owner_of(request))
        await store_of(request).put_file(meta, sink)
    finally:
        await asyncio.to_thread(sink.close)
    return _json(file_object(meta))


def _check_batch_file(sink: BinaryIO) -> None:
    """Refuse a batch input file with a bad line (named by number) or a repeated ``custom_id``; rewind it."""
    try:
        batch_lines.parse_lines(iter(sink))
    finally:
        sink.seek(0)


async def _read_form(reader, sink, limit: int) -> tuple[str | None, str | None, int]:
    """The form's ``purpose``, the file's name and size (spooled into ``sink``; -1 when absent)."""
    purpose = filename = None
    size = -1
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _invalid("nested multipart bodies are not supported", None)
        if part.name == "purpose":
            purpose = _check_purpose(await _field_text(part, "purpose"))
        elif part.name == "file" and size < 0:
            filename = part.filename or "upload"
            size = await _spool(part, sink, limit)
        else:
            await part.release()
    return purpose, filename, size


async def list_files(request: web.Request) -> web.Response:
    """``GET /v1/files``: ``purpose`` filter, ``order`` (``desc`` by default), ``after`` / ``limit`` paging."""
    after, limit = page_params(request.query, default_limit=10000, max_limit=10000)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _invalid(f"'order' must be 'asc' or 'desc', got {order!r}", "order")
    purpose = request.query.get("purpose")
    metas = [m for m in await store_of(request).list_files() if purpose is None or m.purpose == purpose]
    metas.sort(key=lambda m: (m.created_at, m.id), reverse=order == "desc")
    return _json(page([file_object(m) for m in metas], after=after, limit=limit))


async def get_file(request: web.Request) -> web.Response:
    """``GET /v1/files/{file_id}``."""
    return _json(file_object(await store_of(request).file_meta(request.match_info["file_id"])))


async def file_content(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``: the bytes, streamed (fetched through a temporary file)."""
    store = store_of(request)
    sink = await asyncio.to_thread(tempfile.TemporaryFile)
    try:
        meta = await store.read_file_into(request.match_info["file_id"], sink)
        await asyncio.to_thread(sink.seek, 0)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "Content-Disposition": f'attachment; filename="{_quoted(meta.filename)}"'})
        resp.content_length = meta.bytes
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(sink.read, _COPY_CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        await asyncio.to_thread(sink.close)


def _quoted(filename: str) -> str:
    return "".join(c for c in filename if c.isprintable() and c not in '"\\')


async def delete_file(request: web.Request) -> web.Response:
    """``DELETE /v1/files/{file_id}``."""
    file_id = request.match_info["file_id"]
    await store_of(request).delete_file(file_id)
    return _json({"id": file_id, "object": "file", "deleted": True})
