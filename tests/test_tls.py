"""DICOM TLS on the listener, with dcmtk's `storescu +tls` as the modality."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pacs_agent.db.migrate import upgrade
from pacs_agent.settings import Settings
from tests.conftest import sample_path
from tests.support.listener import Listener


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA with a server and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=d,
        )
    return d


def _storescu_tls(port: int, pki: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-v",
            *tls,
            "-aec",
            "PACSAGENT",
            "-xv",
            "127.0.0.1",
            str(port),
            str(sample_path("RG3_J2KR.dcm")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _tls_listener(tmp: Path, pki: Path) -> Listener:
    """The listener with mutual TLS (server certificate, client certificates from our CA)."""
    url = f"sqlite:///{tmp / 'tls.db'}"
    upgrade(url)
    return Listener(
        tmp,
        url,
        tls_cert_file=pki / "server.crt",
        tls_key_file=pki / "server.key",
        tls_ca_file=pki / "ca.crt",
    )


def test_tls_listener_with_client_certificates(tmp_path: Path, pki: Path) -> None:
    lst = _tls_listener(tmp_path, pki)
    try:
        plain = _storescu_tls(lst.port, pki)
        assert plain.returncode != 0  # no TLS: refused
        no_cert = _storescu_tls(lst.port, pki, "+tla", "+cf", str(pki / "ca.crt"))
        assert no_cert.returncode != 0  # TLS without a client certificate: refused
        ok = _storescu_tls(
            lst.port,
            pki,
            "+tls",
            str(pki / "client.key"),
            str(pki / "client.crt"),
            "+cf",
            str(pki / "ca.crt"),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert len(lst.instances()) == 1
    finally:
        lst.stop()


def test_tls_settings_are_checked(tmp_path: Path, pki: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="both"):
        Settings(tls_cert_file=pki / "server.crt")
    with pytest.raises(ValidationError, match="not found"):
        Settings(tls_cert_file=tmp_path / "nope.crt", tls_key_file=pki / "server.key")


def test_results_delivered_over_tls(tmp_path: Path, pki: Path) -> None:
    """dicom+tls:// destinations: the product's C-STORE SCU to a TLS peer (here the listener)."""
    from pacs_agent.dispatching.senders import DeliveryError, client_tls_context, sender_for

    lst = _tls_listener(tmp_path, pki)
    dest = f"dicom+tls://PACSAGENT@127.0.0.1:{lst.port}"
    try:
        with pytest.raises(DeliveryError):  # no client certificate: the peer refuses
            sender_for(dest, tls=client_tls_context(pki / "ca.crt", None, None)).send(
                [sample_path("CT_small.dcm")]
            )
        ctx = client_tls_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        sender_for(dest, tls=ctx).send([sample_path("CT_small.dcm")])
        assert len(lst.instances()) == 1
    finally:
        lst.stop()


def test_two_ae_titles_on_one_tls_host_each_get_every_result_once(
    tmp_path: Path, pki: Path
) -> None:
    """Two dicom+tls:// destinations that differ only in the called AE title (one PACS that
    files by AE title) are two destinations: each gets every result once, also when the job's
    deliveries run again (a redelivered message). Observed at the peer, per association."""
    import threading

    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom import evt
    from sqlalchemy import select

    from pacs_agent.db.models import Delivery, Job, Result, Study
    from pacs_agent.db.session import Database
    from pacs_agent.dispatching.delivery import deliver_job_results
    from pacs_agent.dispatching.senders import client_tls_context, redact

    lst = _tls_listener(tmp_path, pki)
    received: list[tuple[str, str]] = []  # (called AE title, SOP Instance UID) per C-STORE-RQ
    lock = threading.Lock()

    def on_dimse(event: evt.Event) -> None:
        cs = event.message.command_set  # type: ignore[attr-defined]
        if "AffectedSOPInstanceUID" in cs and int(cs.CommandField) == 0x0001:  # C-STORE-RQ
            with lock:
                received.append(
                    (
                        str(event.assoc.requestor.primitive.called_ae_title).strip(),  # type: ignore[union-attr]
                        str(cs.AffectedSOPInstanceUID),
                    )
                )

    lst.server.bind(evt.EVT_DIMSE_RECV, on_dimse)
    dests = [f"dicom+tls://{ae}@127.0.0.1:{lst.port}" for ae in ("ARCHIVE_A", "ARCHIVE_B")]
    assert redact(dests[0]) != redact(dests[1])  # the AE title is part of the identity
    url = f"sqlite:///{tmp_path / 'sender.db'}"
    upgrade(url)
    db = Database(url)
    results = tmp_path / "results"
    results.mkdir()
    sops: list[str] = []
    try:
        with db.session() as s:
            study = Study(study_instance_uid=generate_uid())
            s.add(study)
            s.flush()
            job = Job(study_id=study.id, pipeline="default", destinations=dests)
            s.add(job)
            s.flush()
            for name in ("CT_small.dcm", "MR_small.dcm"):
                ds = dcmread(sample_path(name))
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(results / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                sops.append(str(ds.SOPInstanceUID))
                s.add(
                    Result(
                        job_id=job.id,
                        kind="sc",
                        sop_instance_uid=ds.SOPInstanceUID,
                        series_instance_uid=ds.SeriesInstanceUID,
                        sop_class_uid=ds.SOPClassUID,
                        path=f"{ds.SOPInstanceUID}.dcm",
                    )
                )
            ids = (job.id, study.id)
        ctx = client_tls_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        for _ in range(2):  # the second pass finds everything delivered: nothing is sent
            outcome = deliver_job_results(db, ids[0], ids[1], dests, results_root=results, tls=ctx)
            assert outcome.failed == [] and outcome.pending == []
        with db.session() as s:
            rows = [(d.destination, d.status, d.attempts) for d in s.scalars(select(Delivery))]
        assert sorted(rows) == sorted((d, "done", 1) for d in dests for _ in sops)
        assert sorted(received) == sorted(
            (ae, sop) for ae in ("ARCHIVE_A", "ARCHIVE_B") for sop in sops
        )
    finally:
        lst.stop()
        db.dispose()
