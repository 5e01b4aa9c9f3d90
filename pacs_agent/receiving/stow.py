"""DICOMweb STOW-RS door (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]``.

The request body is ``multipart/related; type="application/dicom"``. It is read as a stream and
each part is written to a temporary file in the agent's spool folder (beside the instance store,
so the store takes it by hard link); memory holds one network chunk, whatever the part's size.
Each part goes through the same ingest as a C-STORE (``parse_part10_file`` then
``Ingestor.ingest_file``, large values left on disk) as soon as its closing delimiter has
arrived, and its temporary file is removed. Every refused part is recorded in ``refusals``. The
answer is the Store Instances Response Module as ``application/dicom+json``: stored instances in
ReferencedSOPSequence, refused ones in FailedSOPSequence with the DIMSE status as FailureReason.

HTTP status: 200 all stored, 202 some stored, 409 none stored, 415 not multipart/related of
application/dicom, 400 a body that is not a multipart message (no part could be delimited).
Parts already stored stay stored when a later part of the same body turns out to be broken: a
re-send is idempotent (same bytes, same SOP Instance UID).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool

from pacs_agent.api.deps import AUTH_RESPONSES, require
from pacs_agent.dicom_facts import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    RejectedDataset,
)
from pacs_agent.receiving.dimse import TRANSFER_SYNTAXES
from pacs_agent.receiving.ingest import Ingestor, parse_part10_file
from pacs_agent.receiving.refusals import RefusedUids, clean_uid, record_refusal, uids_from_file
from pacs_agent.security import SERVICE_ROLE

log = logging.getLogger(__name__)

router = APIRouter()

DICOM_JSON = "application/dicom+json"
# Parts are spooled to disk, not held: this bounds one part's disk use. A larger part is refused
# (0xA700) and its remaining bytes are skipped. Free space is checked every SPACE_CHECK_BYTES.
MAX_PART_BYTES = 4 * 1024 * 1024 * 1024
SPACE_CHECK_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
# PS3.18 Table 10.5.3-... / PS3.4 B.2.3: Referenced Transfer Syntax not supported.
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
_SUPPORTED_TS = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)


# --- multipart/related, streamed --------------------------------------------------------------


class MalformedMultipart(ValueError):
    """The body is not a well-formed multipart message for the announced boundary."""


@dataclass
class Part:
    headers: dict[str, str]
    # The part's body, spooled to a file the caller removes (``discard``); None when refused.
    path: Path | None = None
    size: int = 0
    # Set when the part cannot be stored whatever its content: (DIMSE status, reason).
    refused: tuple[int, str] | None = None

    def read_bytes(self) -> bytes:
        return self.path.read_bytes() if self.path is not None else b""

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


@dataclass
class _PartInProgress:
    headers: dict[str, str]
    path: Path
    file: IO[bytes] | None
    size: int = 0
    since_space_check: int = 0
    refused: tuple[int, str] | None = None


class MultipartReader:
    """Incremental RFC 2046 multipart parser: ``feed`` bytes, get back the parts completed.

    Each part's body goes to its own temporary file in ``spool_dir`` as it arrives; memory holds
    at most one fed chunk plus a delimiter's length. A part over ``max_part_bytes``, or one that
    would leave less than ``min_free_bytes`` on the spool's disk, is cut off: its file is removed,
    its remaining bytes are skipped, and it comes back refused with 0xA700. Preamble and epilogue
    are ignored. Call ``abort`` when the body is given up, to remove a part in progress.
    """

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _END = range(5)

    def __init__(
        self,
        boundary: str,
        spool_dir: Path,
        max_part_bytes: int = MAX_PART_BYTES,
        min_free_bytes: int = 0,
    ) -> None:
        if not 1 <= len(boundary) <= 70:
            raise MalformedMultipart("boundary must be 1 to 70 characters")
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        # A delimiter at the very start of the body has no CRLF before it: pretend it had one.
        self._buf = bytearray(b"\r\n")
        self._state = self._PREAMBLE
        self._part: _PartInProgress | None = None
        self._spool = spool_dir
        self._max = max_part_bytes
        self._min_free = min_free_bytes
        self.parts_seen = 0

    @property
    def finished(self) -> bool:
        return self._state == self._END

    def feed(self, data: bytes) -> list[Part]:
        if self._state == self._END:
            return []  # epilogue
        self._buf += data
        done: list[Part] = []
        while True:
            if self._state == self._PREAMBLE:
                i = self._buf.find(self._delim)
                if i < 0:
                    keep = len(self._delim) - 1
                    if len(self._buf) > keep:
                        del self._buf[: len(self._buf) - keep]
                    return done
                del self._buf[: i + len(self._delim)]
                self._state = self._AFTER_DELIMITER
            elif self._state == self._AFTER_DELIMITER:
                if len(self._buf) < 2:
                    return done
                if self._buf[:2] == b"--":
                    self._state = self._END
                    self._buf.clear()
                    return done
                # Transport padding (linear white space) may follow a delimiter, then CRLF.
                j = 0
                while j < len(self._buf) and self._buf[j] in b" \t":
                    j += 1
                if len(self._buf) < j + 2:
                    if j > 1000:
                        raise MalformedMultipart("endless padding after a boundary delimiter")
                    return done
                if self._buf[j : j + 2] != b"\r\n":
                    raise MalformedMultipart("boundary delimiter not followed by CRLF or --")
                del self._buf[: j + 2]
                self._state = self._HEADERS
            elif self._state == self._HEADERS:
                if self._buf[:2] == b"\r\n":
                    header_block, cut = b"", 2
                else:
                    i = self._buf.find(b"\r\n\r\n")
                    if i < 0:
                        if len(self._buf) > MAX_HEADER_BYTES:
                            raise MalformedMultipart("part headers too long or not terminated")
                        return done
                    header_block, cut = bytes(self._buf[:i]), i + 4
                del self._buf[:cut]
                self._part = self._open_part(_parse_headers(header_block))
                self._state = self._BODY
            elif self._state == self._BODY:
                assert self._part is not None
                i = self._buf.find(self._delim)
                if i < 0:
                    # Keep a tail that could be the start of a delimiter split across chunks.
                    n = len(self._buf) - (len(self._delim) - 1)
                    if n > 0:
                        self._take(bytes(self._buf[:n]))
                        del self._buf[:n]
                    return done
                self._take(bytes(self._buf[:i]))
                del self._buf[: i + len(self._delim)]
                done.append(self._finish_part())
                self._state = self._AFTER_DELIMITER

    def close(self) -> None:
        """The body has ended: raise MalformedMultipart unless the close delimiter was seen."""
        if self._state == self._END:
            return
        self.abort()
        if self._state == self._PREAMBLE and self.parts_seen == 0:
            raise MalformedMultipart("no boundary delimiter found in the body")
        raise MalformedMultipart("body ended before the closing boundary delimiter")

    def abort(self) -> None:
        """Remove the temporary file of a part still in progress (the body was given up)."""
        part, self._part = self._part, None
        if part is not None:
            self._drop_file(part)

    def _open_part(self, headers: dict[str, str]) -> _PartInProgress:
        self._spool.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._spool, prefix="stow-", suffix=".part")
        return _PartInProgress(headers, Path(name), os.fdopen(fd, "wb"))

    @staticmethod
    def _drop_file(part: _PartInProgress) -> None:
        if part.file is not None:
            part.file.close()
            part.file = None
        part.path.unlink(missing_ok=True)

    def _take(self, data: bytes) -> None:
        part = self._part
        assert part is not None
        part.size += len(data)
        if part.refused is not None or not data:
            return
        if part.size > self._max:
            part.refused = (
                STATUS_OUT_OF_RESOURCES,
                f"part over the {self._max} byte limit",
            )
            self._drop_file(part)
            return
        part.since_space_check += len(data)
        if self._min_free and part.since_space_check >= SPACE_CHECK_BYTES:
            part.since_space_check = 0
            if shutil.disk_usage(self._spool).free < self._min_free + len(data):
                part.refused = (STATUS_OUT_OF_RESOURCES, "disk nearly full: refusing to store")
                self._drop_file(part)
                return
        assert part.file is not None
        part.file.write(data)

    def _finish_part(self) -> Part:
        part = self._part
        assert part is not None
        self._part = None
        self.parts_seen += 1
        if part.refused is not None:
            return Part(part.headers, None, part.size, refused=part.refused)
        assert part.file is not None
        part.file.close()
        part.file = None
        return Part(part.headers, part.path, part.size)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        if line[0] in " \t" and headers:  # obsolete line folding
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MalformedMultipart("malformed part header line")
        headers[name.strip().lower()] = value.strip()
    return headers


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): str(v) for k, v in (msg.get_params() or [])[1:]}
    return msg.get_content_type(), params


# --- storing the parts -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartOutcome:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: int | None = None  # DIMSE status; None means stored
    reason: str = ""


def _store_part(
    ingestor: Ingestor, part: Part, study_uid: str | None, client: str | None = None
) -> PartOutcome:
    """Check and store one spooled part; record it in ``refusals`` when refused. The part's
    temporary file is removed in every case."""
    sop_class: str | None = None
    sop_uid: str | None = None
    try:
        try:
            if part.refused is not None:
                raise RejectedDataset(*part.refused)
            declared = part.headers.get("content-type")
            if declared is not None and _media_type(declared)[0] != "application/dicom":
                raise RejectedDataset(
                    STATUS_CANNOT_UNDERSTAND, "part media type is not application/dicom"
                )
            if part.path is None:
                raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "empty dataset (0 bytes)")
            ds = parse_part10_file(part.path)
            sop_class = _uid_or_none(ds, "SOPClassUID")
            sop_uid = _uid_or_none(ds, "SOPInstanceUID")
            ts = UID(str(ds.file_meta.TransferSyntaxUID).strip().rstrip("\x00"))
            if str(ts) not in _SUPPORTED_TS:
                raise RejectedDataset(
                    STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax is not accepted"
                )
            if study_uid is not None and _uid_or_none(ds, "StudyInstanceUID") != study_uid:
                raise RejectedDataset(
                    STATUS_DATASET_MISMATCH, "instance of another study than the one in the URL"
                )
            ingestor.ingest_file(part.path, ts, source="stow", ds=ds)
            return PartOutcome(sop_class, sop_uid)
        except RejectedDataset as exc:
            status, reason = exc.status, exc.reason
            log.warning("STOW-RS refused sop=%s: 0x%04X %s", clean_uid(sop_uid), status, reason)
        except Exception as exc:
            status, reason = STATUS_PROCESSING_FAILURE, f"processing failure ({type(exc).__name__})"
            # No traceback: its frames and messages can quote dataset values.
            log.error("STOW-RS failed sop=%s: %s", clean_uid(sop_uid), reason)
        uids = RefusedUids(clean_uid(sop_uid), clean_uid(sop_class))
        if part.path is not None:
            uids = uids.or_else(uids_from_file(part.path))
        record_refusal(
            ingestor.db,
            door="stow",
            status=status,
            reason=reason,
            uids=uids,
            sender_address=client,
        )
        return PartOutcome(sop_class, sop_uid, status, reason)
    finally:
        part.discard()


def _uid_or_none(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00")
    return text or None


def _response_dataset(outcomes: list[PartOutcome], base_url: str) -> dict[str, Any]:
    ds = Dataset()
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    if stored:
        items = []
        for o in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = o.sop_class_uid
            item.ReferencedSOPInstanceUID = o.sop_instance_uid
            # The agent serves the stored Part 10 file here (bearer token when one is set).
            item.RetrieveURL = f"{base_url}/api/instances/{o.sop_instance_uid}"
            items.append(item)
        ds.ReferencedSOPSequence = items
    if failed:
        items = []
        for o in failed:
            item = Dataset()
            # Type 1 in PS3.18, but unknowable for a part that is not DICOM: left empty then.
            item.ReferencedSOPClassUID = _valid_uid(o.sop_class_uid)
            item.ReferencedSOPInstanceUID = _valid_uid(o.sop_instance_uid)
            item.FailureReason = o.failure
            items.append(item)
        ds.FailedSOPSequence = items
    return ds.to_json_dict()


def _valid_uid(value: str | None) -> str | None:
    if value is None or len(value) > 64 or not all(c.isdigit() or c == "." for c in value):
        return None
    return value


# --- the endpoint ------------------------------------------------------------------------------


def stow_spool(data_dir: Path) -> Path:
    """Where parts are spooled: the listener's spool folder (beside the instance store, so the
    store hard-links a part instead of copying it; emptied at start by ``prepare_spool``)."""
    return data_dir / "spool"


def _boundary_of(content_type: str | None) -> str:
    if not content_type:
        raise HTTPException(415, detail='expected multipart/related; type="application/dicom"')
    media, params = _media_type(content_type)
    if media != "multipart/related":
        raise HTTPException(415, detail=f"expected multipart/related, not {media}")
    part_type = params.get("type")
    if part_type is not None and _media_type(part_type)[0] != "application/dicom":
        raise HTTPException(
            415, detail=f'only type="application/dicom" is accepted, not {part_type!r}'
        )
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, detail="multipart/related without a boundary parameter")
    return boundary


async def _stow(request: Request, study_uid: str | None) -> Response:
    state = request.app.state.agent
    min_free = state.settings.min_free_disk_mb * 1024 * 1024
    try:
        reader = MultipartReader(
            _boundary_of(request.headers.get("content-type")),
            spool_dir=stow_spool(state.settings.resolved_data_dir),
            min_free_bytes=min_free,
        )
    except MalformedMultipart as exc:
        raise HTTPException(400, detail=str(exc)) from None
    ingestor = Ingestor(
        state.db,
        state.store,
        min_free_bytes=min_free,
        stored_by=state.settings.resolved_agent_url,
    )
    client = request.client.host if request.client else None
    outcomes: list[PartOutcome] = []
    try:
        async for chunk in request.stream():
            parts = reader.feed(chunk)
            try:
                for part in parts:
                    outcomes.append(
                        await run_in_threadpool(_store_part, ingestor, part, study_uid, client)
                    )
            finally:
                for part in parts:  # stored or refused parts are gone already
                    part.discard()
        reader.close()
    except MalformedMultipart as exc:
        if not outcomes:
            raise HTTPException(400, detail=f"malformed multipart body: {exc}") from None
        # What came before the break is stored; the broken tail is reported as one failure.
        log.warning("STOW-RS body broken after %d parts: %s", len(outcomes), exc)
        outcomes.append(PartOutcome(None, None, STATUS_CANNOT_UNDERSTAND, str(exc)))
        await run_in_threadpool(
            record_refusal,
            state.db,
            door="stow",
            status=STATUS_CANNOT_UNDERSTAND,
            reason=f"multipart body broken after {len(outcomes) - 1} parts: {exc}",
            sender_address=client,
        )
    finally:
        reader.abort()  # a client that went away leaves no part file behind
    if not outcomes:
        raise HTTPException(400, detail="multipart body without parts")
    n_failed = sum(1 for o in outcomes if o.failure is not None)
    status = 200 if n_failed == 0 else 409 if n_failed == len(outcomes) else 202
    log.info("STOW-RS: %d stored, %d refused", len(outcomes) - n_failed, n_failed)
    # The configured public address when there is one: clients' Host headers are not reliable
    # (dicomweb-client sends the host name without the port).
    base = (state.settings.agent_url or str(request.base_url)).rstrip("/")
    return JSONResponse(
        _response_dataset(outcomes, base), status_code=status, media_type=DICOM_JSON
    )


STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (PS3.18 response dataset, DICOM JSON)"},
    202: {"description": "some instances stored, some refused (see FailedSOPSequence)"},
    400: {"description": "the multipart body could not be read"},
    409: {"description": "no instance stored (see FailedSOPSequence)"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
    **AUTH_RESPONSES,
}


@router.post(
    "/dicomweb/studies",
    dependencies=[Depends(require(SERVICE_ROLE))],
    responses=STOW_RESPONSES,
)
async def stow_studies(request: Request) -> Response:
    return await _stow(request, None)


@router.post(
    "/dicomweb/studies/{study_uid}",
    dependencies=[Depends(require(SERVICE_ROLE))],
    responses=STOW_RESPONSES,
)
async def stow_study(study_uid: str, request: Request) -> Response:
    return await _stow(request, study_uid)
