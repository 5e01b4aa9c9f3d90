"""The DICOM listener against dcmtk's storescu/echoscu and a pynetdicom SCU: real associations,
real files on disk, real database rows; every bad input gets its own status and the listener
keeps serving."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from pacs_agent.db.models import Study
from pacs_agent.receiving.dimse import start_scp
from pacs_agent.receiving.ingest import Ingestor
from tests.conftest import sample_path, storescu
from tests.support.listener import Listener

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def listener(tmp_path: Path, database_url: str) -> Iterator[Listener]:
    lst = Listener(tmp_path, database_url)
    yield lst
    lst.stop()


def _assert_still_serving(lst: Listener) -> None:
    res = subprocess.run(
        ["echoscu", "-aec", "PACSAGENT", "127.0.0.1", str(lst.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr


def test_echo(listener: Listener) -> None:
    _assert_still_serving(listener)


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG1_UNCR.dcm"])
def test_store_radiograph_is_fsynced_and_recorded(listener: Listener, name: str) -> None:
    src = sample_path(name)
    res = storescu(listener.port, src)
    assert res.returncode == 0, res.stderr
    ds = dcmread(src, stop_before_pixels=True)
    [inst] = listener.instances()
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert inst.analysable
    assert inst.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID  # stored as received
    stored = listener.store.path_for(inst.path)
    # Named by UIDs only, never patient data.
    assert stored.name == f"{ds.SOPInstanceUID}.dcm"
    assert str(ds.PatientName) not in str(stored)
    back = dcmread(stored)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == dcmread(src).PixelData


def test_resend_same_instance_is_idempotent(listener: Listener) -> None:
    src = sample_path("RG3_J2KR.dcm")
    assert storescu(listener.port, src).returncode == 0
    assert storescu(listener.port, src).returncode == 0
    assert len(listener.instances()) == 1


def _truncated_copy(tmp: Path) -> Path:
    ds = dcmread(sample_path("RG1_UNCR.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    out = tmp / "truncated.dcm"
    ds.save_as(out)
    return out


def _status_of(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def test_truncated_pixel_data_is_refused(listener: Listener, tmp_path: Path) -> None:
    res = storescu(listener.port, _truncated_copy(tmp_path))
    out = _status_of(res)
    assert "DataSetDoesNotMatchSOPClass" in out, out
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_rows_zero_is_refused(listener: Listener, tmp_path: Path) -> None:
    ds = dcmread(sample_path("RG3_J2KR.dcm"))
    ds.Rows = 0
    ds.save_as(tmp_path / "rows0.dcm")
    out = _status_of(storescu(listener.port, tmp_path / "rows0.dcm"))
    assert "DataSetDoesNotMatchSOPClass" in out, out
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_missing_study_uid_is_refused(listener: Listener, tmp_path: Path) -> None:
    ds = dcmread(sample_path("RG3_J2KR.dcm"))
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "nostudy.dcm")
    out = _status_of(storescu(listener.port, tmp_path / "nostudy.dcm"))
    assert "DataSetDoesNotMatchSOPClass" in out, out
    assert listener.instances() == []


def test_non_image_sop_class_is_stored_not_analysed(listener: Listener) -> None:
    sr = sample_path("test-SR.dcm")
    assert storescu(listener.port, sr).returncode == 0
    [inst] = listener.instances()
    assert not inst.analysable
    assert "non-image" in (inst.reason or "")


def test_pixel_spacing_zero_is_accepted(listener: Listener) -> None:
    # RG1 itself carries Pixel Spacing 0.000: the image is kept and analysed; writers must not
    # copy the invalid value into outputs (tested in the writer tests).
    ds = dcmread(sample_path("RG1_J2KR.dcm"), stop_before_pixels=True)
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    assert storescu(listener.port, sample_path("RG1_J2KR.dcm")).returncode == 0
    [inst] = listener.instances()
    assert inst.analysable


def _raw_file(tmp: Path, body: bytes) -> Path:
    """A Part 10 header followed by ``body`` as the dataset: pynetdicom streams it unparsed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    from pydicom.filewriter import write_file_meta_info

    out = tmp / f"raw-{len(body)}.dcm"
    with open(out, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(body)
    return out


@pytest.mark.parametrize(
    "body", [b"this is not DICOM at all, just text." * 10, b""], ids=["not-dicom", "zero-bytes"]
)
def test_undecodable_dataset_is_refused(
    listener: Listener, tmp_path: Path, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _raw_file(tmp_path, body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status in (0xC210, 0xA900), hex(status.Status)
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_wrong_calling_ae_is_rejected(tmp_path: Path, database_url: str) -> None:
    lst = Listener(tmp_path, database_url, allowed_calling_aes=["GOODMOD"])
    try:
        bad = storescu(lst.port, sample_path("RG3_J2KR.dcm"), aet="BADMOD")
        assert bad.returncode != 0
        assert lst.instances() == []
        good = storescu(lst.port, sample_path("RG3_J2KR.dcm"), aet="GOODMOD")
        assert good.returncode == 0, good.stderr
        assert len(lst.instances()) == 1
    finally:
        lst.stop()


def test_study_rows_link_instances(listener: Listener) -> None:
    assert (
        storescu(listener.port, sample_path("RG1_J2KR.dcm"), sample_path("RG3_J2KR.dcm")).returncode
        == 0
    )
    with listener.db.session() as s:
        studies = list(s.scalars(select(Study)))
    assert {st.status for st in studies} == {"receiving"}
    assert sum(1 for _ in listener.instances()) == 2


def test_same_uid_different_bytes_is_a_recorded_conflict(
    listener: Listener, tmp_path: Path
) -> None:
    from pacs_agent.db.models import Event

    src = sample_path("RG3_J2KR.dcm")
    assert storescu(listener.port, src).returncode == 0
    ds = dcmread(src)
    ds.ImageComments = "changed after sending"
    ds.save_as(tmp_path / "changed.dcm")
    assert storescu(listener.port, tmp_path / "changed.dcm").returncode == 0
    [inst] = listener.instances()
    first = listener.store.path_for(inst.path)
    assert dcmread(first).get("ImageComments") != "changed after sending"  # first kept
    conflicts = list(first.parent.glob("*.conflict-*.dcm"))
    assert len(conflicts) == 1 and dcmread(conflicts[0]).ImageComments == "changed after sending"
    with listener.db.session() as s:
        kinds = [e.kind for e in s.scalars(select(Event))]
    assert "instance.conflict" in kinds


def test_disk_nearly_full_answers_out_of_resources(tmp_path: Path, database_url: str) -> None:
    lst = Listener(tmp_path, database_url)
    lst.server.shutdown()
    # The same listener, with a free-space floor above what any disk has.
    lst.server = start_scp(lst.settings, Ingestor(lst.db, lst.store, min_free_bytes=1 << 60))
    try:
        out = _status_of(storescu(lst.port, sample_path("RG3_J2KR.dcm")))
        assert "OutOfResources" in out, out
        assert lst.instances() == []
        assert not any(lst.store.root.rglob("*.dcm"))
        _assert_still_serving(lst)
    finally:
        lst.stop()


def test_truncated_encapsulated_pixel_data_is_refused(listener: Listener, tmp_path: Path) -> None:
    # A JPEG 2000 radiograph cut off in the middle of its compressed stream.
    data = sample_path("RG3_J2KR.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    ds = dcmread(sample_path("RG3_J2KR.dcm"), stop_before_pixels=True)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
        assert assoc.is_established
        status = assoc.send_c_store(cut)
        assoc.release()
    finally:
        monkey.undo()
    assert status.Status in (0xC210, 0xA900), hex(status.Status)
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_association_aborted_mid_dataset_records_nothing(
    listener: Listener, tmp_path: Path
) -> None:
    """The sender aborts after part of a dataset was sent: nothing partial is recorded."""
    import threading
    import time

    from pynetdicom.pdu_primitives import P_DATA

    src = sample_path("RG1_UNCR.dcm")  # 7 MB: hundreds of P-DATA PDUs
    ds = dcmread(src, stop_before_pixels=True)
    ae = AE(ae_title="MODALITY")
    ae.dimse_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT", max_pdu=16384)
    assert assoc.is_established
    send_pdu = assoc.dul.send_pdu
    sent = {"pdata": 0}

    def cut_after_20(primitive: object) -> None:
        if isinstance(primitive, P_DATA):
            sent["pdata"] += 1
            if sent["pdata"] == 20:
                threading.Thread(target=assoc.abort).start()
            if sent["pdata"] >= 20:
                return  # the rest of the dataset never leaves
        send_pdu(primitive)

    assoc.dul.send_pdu = cut_after_20  # type: ignore[method-assign]
    status = assoc.send_c_store(src)
    time.sleep(1)
    assert sent["pdata"] >= 20 and not status  # no response: the association was aborted
    assert assoc.is_aborted
    assert listener.instances() == []
    assert not list(listener.store.root.rglob("*.dcm"))
    assert not list(listener.store.root.rglob(".incoming-*"))
    _assert_still_serving(listener)
    # pynetdicom's partial file stays in the agent's spool (not the system's /tmp) until the
    # next start, which removes it.
    spool = listener.settings.resolved_data_dir / "spool"
    assert len(list(spool.iterdir())) == 1
    listener.server.shutdown()
    listener.server = start_scp(listener.settings, Ingestor(listener.db, listener.store))
    assert list(spool.iterdir()) == []


def test_unsupported_transfer_syntax_is_not_accepted(listener: Listener) -> None:
    # MPEG-2 is not decodable here: the presentation context is refused, nothing is stored.
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR, "1.2.840.10008.1.2.4.100")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
    if assoc.is_established:
        assert assoc.accepted_contexts == []
        assoc.release()
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_uid_longer_than_64_characters_is_refused(listener: Listener, tmp_path: Path) -> None:
    ds = dcmread(sample_path("RG3_J2KR.dcm"))
    ds.SeriesInstanceUID = "1.2." + "3" * 70
    ds.save_as(tmp_path / "longuid.dcm")
    out = _status_of(storescu(listener.port, tmp_path / "longuid.dcm"))
    assert "DataSetDoesNotMatchSOPClass" in out, out
    assert listener.instances() == []
    _assert_still_serving(listener)


def test_several_associations_at_once(listener: Listener, tmp_path: Path) -> None:
    """Four modalities sending at the same time, into the same study."""
    import os

    base = dcmread(sample_path("CT_small.dcm"))
    groups = []
    for g in range(4):
        files = []
        for i in range(10):
            base.SOPInstanceUID = generate_uid()
            base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
            p = tmp_path / f"g{g}-{i}.dcm"
            base.save_as(p, enforce_file_format=True)
            files.append(str(p))
        groups.append(files)
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                f"MOD{g}",
                "-aec",
                "PACSAGENT",
                "127.0.0.1",
                str(listener.port),
                *files,
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for g, files in enumerate(groups)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stdout.read() if p.stdout else ""
    instances = listener.instances()
    assert len(instances) == 40
    assert len({i.study_id for i in instances}) == 1  # one study row despite the races


def _ct_copies(tmp: Path, prefix: str, n: int) -> list[Path]:
    base = dcmread(sample_path("CT_small.dcm"))
    base.StudyInstanceUID, base.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        p = tmp / f"{prefix}-{i}.dcm"
        base.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def _store_all(port: int, files: list[Path], aet: str) -> list[int]:
    """One pynetdicom association sending ``files``: the status of each C-STORE, in order."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(dcmread(files[0], stop_before_pixels=True).SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    assert assoc.is_established
    try:
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(dcmread(f))
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        return statuses
    finally:
        assoc.release()


def _refuse_instance_rows(listener: Listener, on: bool) -> None:
    """A real database failure for every instance row: a trigger that aborts the INSERT."""
    from sqlalchemy import text

    with listener.db.session() as s:
        pg = s.get_bind().dialect.name == "postgresql"
        if on and pg:
            s.execute(
                text(
                    "CREATE FUNCTION refuse_rows() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql"
                )
            )
            s.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON instances "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_rows()"
                )
            )
        elif on:
            s.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON instances "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )
        else:
            s.execute(text("DROP TRIGGER refuse ON instances" if pg else "DROP TRIGGER refuse"))


def test_failed_group_commit_fails_each_c_store_and_keeps_serving(
    listener: Listener, tmp_path: Path
) -> None:
    """Four associations at once while every row insert fails: each C-STORE is answered with a
    failure (0xC211), none with Success; after the fault is gone the same files are stored."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [_ct_copies(tmp_path, f"b{g}", 5) for g in range(4)]
    _refuse_instance_rows(listener, on=True)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda g: _store_all(listener.port, batches[g], f"MOD{g}"), range(4))
        )
    assert [s for r in results for s in r] == [0xC211] * 20, results
    assert listener.instances() == []
    _refuse_instance_rows(listener, on=False)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda g: _store_all(listener.port, batches[g], f"MOD{g}"), range(4))
        )
    assert [s for r in results for s in r] == [0x0000] * 20, results
    assert len(listener.instances()) == 20
    _assert_still_serving(listener)


# --- the receive path's shortcuts (issue 12): each keeps what it replaces ---------------------


def test_folder_entries_are_fsynced_once_and_again_after_the_folder_is_removed(
    tmp_path: Path,
) -> None:
    """The first instance of a series fsyncs the store root and study folder (the new folders'
    entries) and the series folder; later ones only the series folder; once retention has
    removed the study folder, the next instance fsyncs all three again."""
    import shutil

    from pacs_agent.receiving.store import InstanceStore, fsync_dir

    store = InstanceStore(tmp_path / "store")
    src = sample_path("CT_small.dcm")

    def stage(sop: str) -> tuple[Path, ...]:
        staged = store.stage_file("1.2.3", "1.2.3.4", sop, src)
        for folder in staged.folders_to_sync:
            fsync_dir(folder)
        store.entries_synced(staged.entries, staged.generation)
        return staged.folders_to_sync

    study, series = store.root / "1.2.3", store.root / "1.2.3" / "1.2.3.4"
    assert stage("1.1") == (store.root, study, series)
    assert stage("1.2") == (series,)
    shutil.rmtree(study)
    assert stage("1.3") == (store.root, study, series)
    assert stage("1.4") == (series,)
    # A mark made for a file staged before another folder was created is dropped.
    staged = store.stage_file("1.2.5", "1.2.5.6", "1.5", src)
    store.stage_file("1.2.7", "1.2.7.8", "1.6", src)  # creates folders: generation moves on
    store.entries_synced(staged.entries, staged.generation)
    again = store.stage_file("1.2.5", "1.2.5.6", "1.7", src)
    other = store.root / "1.2.5"
    assert again.folders_to_sync == (store.root, other, other / "1.2.5.6")


def test_a_bad_value_is_refused_after_the_same_element_was_good(tmp_path: Path) -> None:
    """Values decoded once are not decoded again, but the memo is keyed by the bytes: a value
    of the same element that cannot be decoded is still refused (0xC210, named by attribute)."""
    from pacs_agent.dicom_facts import RejectedDataset
    from pacs_agent.receiving.ingest import parse_part10_file

    good = dcmread(sample_path("CT_small.dcm"))
    parse_part10_file(sample_path("CT_small.dcm"))
    parse_part10_file(sample_path("CT_small.dcm"))  # now every small value is memoised
    # Rows (US) with three bytes: no unsigned short, whatever the mode.
    bad_path = tmp_path / "bad.dcm"
    good.save_as(bad_path)
    raw = bad_path.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00" + good.Rows.to_bytes(2, "little")
    assert raw.count(rows) == 1
    bad_path.write_bytes(raw.replace(rows, b"\x28\x00\x10\x00US\x03\x00abc"))
    with pytest.raises(RejectedDataset) as exc:
        parse_part10_file(bad_path)
    assert exc.value.status == 0xC210
    assert "Rows" in exc.value.reason and "cannot be decoded" in exc.value.reason


def test_pdus_are_read_whole_and_a_short_read_returns_what_came() -> None:
    """The listener's PDU read (one buffer per PDU) keeps pynetdicom's contract: all the bytes
    asked for, in order, across many partial reads; fewer when the peer closes early."""
    import socket
    import threading

    from pacs_agent.receiving.dimse import _recv_whole

    class Holder:  # the one attribute _recv_whole uses of pynetdicom's AssociationSocket
        def __init__(self, sock: socket.socket) -> None:
            self.socket = sock

    a, b = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, larger than one socket read
    sender = threading.Thread(target=lambda: (b.sendall(payload + b"tail"), b.close()))
    sender.start()
    try:
        got = _recv_whole(Holder(a), len(payload))  # type: ignore[arg-type]
        assert bytes(got) == payload
        assert bytes(_recv_whole(Holder(a), 100)) == b"tail"  # type: ignore[arg-type]
    finally:
        sender.join()
        a.close()
