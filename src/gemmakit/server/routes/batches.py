"""OpenAI's Files and Batches APIs: ``/v1/files`` (purpose ``batch``) and ``/v1/batches``, backed by the data
directory (``--data-dir``) and run by the server's batch worker at low priority (see gemmakit.batch.worker)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ...batch.files import URLS
from ...batch.store import ACTIVE, COMPLETION_WINDOWS, BatchStore
from ..errors import APIError
from ..protocol import BatchCreateRequest
from ..state import ServerState, server_state

router = APIRouter()
MAX_LIST = 100


def _store(state: ServerState) -> BatchStore:
    if state.batches is None:
        raise APIError(501, "files and batches are kept in a data directory, and this server has none (start it "
                       "with --data-dir DIR)", "server_error", code="batches_unavailable")
    return state.batches


def _found(record: dict[str, Any] | None, kind: str, record_id: str) -> dict[str, Any]:
    """``record``, or a 404 naming the ``kind`` (file, batch) and id that were not found."""
    if record is None:
        raise APIError(404, f"no {kind} with id {record_id!r}", param=f"{kind}_id", code=f"{kind}_not_found")
    return record


def _file(store: BatchStore, file_id: str) -> dict[str, Any]:
    return _found(store.get_file(file_id), "file", file_id)


@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
    store = _store(server_state(request))
    if purpose != "batch":
        raise APIError(400, f"purpose {purpose!r}: this server keeps files for purpose 'batch' only", param="purpose")
    return await run_in_threadpool(store.add_file, file.file, file.filename or "upload.jsonl", purpose)


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": _store(server_state(request)).list_files(purpose)}


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return _file(_store(server_state(request)), file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request) -> FileResponse:
    store = _store(server_state(request))
    _file(store, file_id)
    return FileResponse(store.file_path(file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    store = _store(server_state(request))
    _file(store, file_id)
    store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/v1/batches")
def create_batch(body: BatchCreateRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    store = _store(state)
    if body.endpoint not in URLS:
        raise APIError(400, f"endpoint {body.endpoint!r}: this server batches {', '.join(URLS)}", param="endpoint")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise APIError(400, f"completion_window {body.completion_window!r}: use "
                       f"{', '.join(COMPLETION_WINDOWS)}", param="completion_window")
    found = store.get_file(body.input_file_id)
    if found is None or found["purpose"] != "batch":
        raise APIError(400, f"input_file_id {body.input_file_id!r} is not an uploaded file of purpose 'batch'",
                       param="input_file_id")
    batch = store.add_batch(body.input_file_id, body.endpoint, body.completion_window, body.metadata)
    state.batch_worker.notify()
    return batch


def _batch(store: BatchStore, batch_id: str) -> dict[str, Any]:
    return _found(store.get_batch(batch_id), "batch", batch_id)


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return _batch(_store(server_state(request)), batch_id)


@router.get("/v1/batches")
def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    if not 1 <= limit <= MAX_LIST:
        raise APIError(400, f"limit {limit}: between 1 and {MAX_LIST}", param="limit")
    batches = _store(server_state(request)).list_batches(after, limit + 1)
    page = batches[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    store = _store(state)
    batch = _batch(store, batch_id)
    if batch["status"] not in ACTIVE:
        raise APIError(400, f"batch {batch_id} is {batch['status']}: only a running batch can be cancelled",
                       param="batch_id")
    if batch["status"] != "cancelling":
        batch = store.update_batch(batch_id, status="cancelling")
    state.batch_worker.notify()
    return batch
