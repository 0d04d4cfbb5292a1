"""A loopback Batch API: OpenAI's Files and Batches endpoints in front of the scripted teacher.

:class:`BatchAPIServer` is a :class:`~tests.support.hosted_api.HostedAPIServer` (so the online
chat endpoint and its rules stay) that also serves, as the OpenAI API reference describes them:

* ``POST /v1/files`` (multipart, ``purpose=batch``): the file object; a file over
  ``max_bytes_per_file`` is refused with 400, as is a purpose other than ``batch``;
* ``GET /v1/files/{id}/content``: the file's bytes (request, output and error files);
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``): a batch in
  ``validating``;
* ``GET /v1/batches/{id}``: each look moves the batch one status on, ``validating`` ->
  ``in_progress`` -> ``finalizing`` -> ``completed``, with ``request_counts``. Validation fails
  the batch (``failed``, ``errors.data``) for a file of more than ``max_requests_per_file``
  lines, a line that is not JSON or lacks ``custom_id``/``method``/``url``/``body``, a repeated
  ``custom_id``, or another ``url`` than the batch's endpoint. While :attr:`hold` is clear a batch
  stays ``in_progress`` (a job can be killed "while a batch runs").

The answers are the responder's. On ``finalizing`` each line is answered: an output-file line
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}``,
or an error-file line for a :class:`~tests.support.openai_servers.ScriptedHTTPError` (the
response with that status and OpenAI's error body). A batch whose id is in :attr:`expire`
answers its first half and ends ``expired``, the rest in its error file with ``error``
``{"code": "batch_expired"}``. :attr:`created` lists every batch created, with its custom ids, so
a test can assert that no request was submitted twice.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from tests.support.hosted_api import HostedAPIServer
from tests.support.openai_servers import _json_response, openai_error_body

STEPS = ("validating", "in_progress", "finalizing", "completed")


class BatchAPIServer(HostedAPIServer):
    def __init__(
        self,
        *args: Any,
        max_requests_per_file: int = 50_000,
        max_bytes_per_file: int = 200 * 2**20,
        **kwargs: Any,
    ) -> None:
        import threading

        super().__init__(*args, **kwargs)
        self.max_requests_per_file, self.max_bytes_per_file = (
            max_requests_per_file,
            max_bytes_per_file,
        )
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created: list[tuple[str, list[str]]] = []  # (batch id, custom ids) per create
        self.expire: set[str] = set()  # ids of batches to end expired, half answered
        self.expire_next = False  # the next batch created is added to ``expire``
        self.hold = threading.Event()
        self.hold.set()

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve)
        return app

    # ------------------------------------------------------------------ files

    def _add_file(self, name: str, data: bytes, purpose: str) -> dict[str, Any]:
        file = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
        }
        self.files[file["id"]] = {**file, "data": data}
        return file

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch" or upload is None or isinstance(upload, str):
            return _json_response(
                400,
                openai_error_body(
                    "'purpose' must be 'batch' with a file", "invalid_request_error", None
                ),
            )
        data = upload.file.read()
        if len(data) > self.max_bytes_per_file:
            message = f"File is too large: {len(data)} bytes, at most {self.max_bytes_per_file}."
            return _json_response(
                400, openai_error_body(message, "invalid_request_error", "file_too_large")
            )
        return _json_response(200, self._add_file(upload.filename, data, "batch"))

    async def _content(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        file = self.files.get(request.match_info["file_id"])
        if file is None:
            return _json_response(
                404, openai_error_body("No such File object", "invalid_request_error", None)
            )
        return web.Response(body=file["data"], content_type="application/octet-stream")

    # ------------------------------------------------------------------ batches

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        body = await request.json()
        file = self.files.get(body.get("input_file_id", ""))
        if file is None or body.get("endpoint") != "/v1/chat/completions":
            return _json_response(
                400,
                openai_error_body(
                    "invalid input_file_id or endpoint", "invalid_request_error", None
                ),
            )
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": file["id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch_id] = batch
        ids = [json.loads(line).get("custom_id") for line in _lines(file["data"])]
        self.created.append((batch_id, ids))
        if self.expire_next:
            self.expire.add(batch_id)
            self.expire_next = False
        return _json_response(200, batch)

    async def _retrieve(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _json_response(
                404, openai_error_body("No such Batch object", "invalid_request_error", None)
            )
        status = batch["status"]
        if status == "validating":
            await self._validate(batch)
        elif status == "in_progress" and self.hold.is_set():
            batch["status"] = "finalizing"
        elif status == "finalizing":
            await self._finish(batch)
        return _json_response(200, batch)

    async def _validate(self, batch: dict[str, Any]) -> None:
        lines = _lines(self.files[batch["input_file_id"]]["data"])
        errors, seen = [], set()
        if len(lines) > self.max_requests_per_file:
            errors.append(
                {
                    "code": "too_many_requests",
                    "message": f"The batch input file has {len(lines)} requests, more than the "
                    f"limit of {self.max_requests_per_file}.",
                    "param": None,
                    "line": None,
                }
            )
        for number, text in enumerate(lines, 1):
            try:
                line = json.loads(text)
                missing = [k for k in ("custom_id", "method", "url", "body") if k not in line]
            except ValueError:
                line, missing = {}, ["a JSON object"]
            why = f"missing {missing[0]}" if missing else ""
            if not why and line["custom_id"] in seen:
                why = "duplicate custom_id"
            if not why and line["url"] != batch["endpoint"]:
                why = f"url {line['url']} is not the batch's endpoint"
            if why:
                errors.append(
                    {"code": "invalid_request", "message": why, "param": None, "line": number}
                )
            seen.add(line.get("custom_id"))
        batch["request_counts"]["total"] = len(lines)
        if errors:
            batch.update(status="failed", errors={"object": "list", "data": errors})
            batch["failed_at"] = int(time.time())
        else:
            batch["status"] = "in_progress"

    async def _finish(self, batch: dict[str, Any]) -> None:
        lines = [json.loads(t) for t in _lines(self.files[batch["input_file_id"]]["data"])]
        expired = batch["id"] in self.expire
        answered = lines[: len(lines) // 2] if expired else lines
        output, errors = [], []
        for line in answered:
            body = line["body"]
            served = await self._serve(body)
            if isinstance(served, web.Response):  # a scripted HTTP error
                status, reply = served.status, json.loads(served.body)
            else:
                status, reply = 200, self._completion(body, served)
                self._record_status(200, line["custom_id"])
            entry = {
                "id": f"batch_req_{uuid.uuid4().hex[:20]}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": reply},
                "error": None,
            }
            (output if status == 200 else errors).append(entry)
        for line in lines[len(answered) :]:
            errors.append(
                {
                    "id": f"batch_req_{uuid.uuid4().hex[:20]}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion "
                        "window expired.",
                    },
                }
            )
        if output:
            batch["output_file_id"] = self._add_file(
                "output.jsonl", _jsonl(output), "batch_output"
            )["id"]
        if errors:
            batch["error_file_id"] = self._add_file("errors.jsonl", _jsonl(errors), "batch_output")[
                "id"
            ]
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        batch["status"] = "expired" if expired else "completed"


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8").splitlines() if line.strip()]


def _jsonl(entries: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
