"""`make demo`: run the all-in-one agent, send the sample radiographs, show what came back.

Starts `pacs-agent run` on embedded defaults (SQLite, embedded broker, DEMO bundle with seeded
random weights) on free ports, sends RG1 (chest PA, JPEG 2000) and RG3 (extremity) from the
pydicom-data package with dcmtk's storescu, waits for every study to reach a terminal state,
prints a summary of each result object and the folder holding them, and stops.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydicom import dcmread

SAMPLES = ["RG1_J2KR.dcm", "RG3_J2KR.dcm"]
TERMINAL = {"done", "failed", "skipped"}
PROPOSE = {"1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise SystemExit(f"sample {name} not found: is pydicom-data installed?")
    return Path(str(path))


def _wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("the agent exited during start-up (see its log above)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the agent did not become healthy within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("demo-output"))
    ap.add_argument("--data-dir", type=Path, default=Path("data/demo"))
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu (Debian package dcmtk) is needed: run `make system-deps`")

    output = args.output.resolve()
    data_dir = args.data_dir.resolve()
    for folder in (output, data_dir):  # a demo starts from nothing, so it is repeatable
        shutil.rmtree(folder, ignore_errors=True)
    dicom_port, http_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    token = secrets.token_urlsafe(32)
    auth = {"authorization": f"Bearer {token}"}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")},
        "PACS_AGENT_DATA_DIR": str(data_dir),
        "PACS_AGENT_OUTPUT_DIR": str(output),
        "PACS_AGENT_DICOM_PORT": str(dicom_port),
        "PACS_AGENT_HTTP_PORT": str(http_port),
        "PACS_AGENT_HTTP_HOST": "127.0.0.1",
        "PACS_AGENT_QUIET_PERIOD_S": "2",
        # The API is closed by default: the demo reads it with a service token of its own.
        "PACS_AGENT_API_TOKEN": token,
    }
    print(f"starting the agent (DICOM port {dicom_port}, HTTP {url}, data {data_dir})", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "pacs_agent.cli", "run"], env=env)
    try:
        _wait_health(url, proc, 180)
        studies = []
        for name in SAMPLES:
            path = _sample(name)
            ds = dcmread(path, stop_before_pixels=True)
            flag = PROPOSE.get(str(ds.file_meta.TransferSyntaxUID), "-x=")
            res = subprocess.run(
                [
                    "storescu",
                    "-aet",
                    "DEMOMOD",
                    "-aec",
                    "PACSAGENT",
                    flag,
                    "127.0.0.1",
                    str(dicom_port),
                    str(path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if res.returncode != 0:
                raise SystemExit(f"storescu failed for {name}: {res.stderr.strip()}")
            print(f"sent {name} (study {ds.StudyInstanceUID})", flush=True)
            studies.append(str(ds.StudyInstanceUID))
        ok = True
        for uid in studies:
            end = time.monotonic() + args.timeout
            info: dict | None = None
            while time.monotonic() < end:
                r = httpx.get(f"{url}/api/studies/{uid}", headers=auth, timeout=10)
                info = r.json() if r.status_code == 200 else None
                if info and info["status"] in TERMINAL:
                    break
                if proc.poll() is not None:
                    raise SystemExit("the agent exited while processing")
                time.sleep(1)
            if not info or info["status"] not in TERMINAL:
                print(f"study {uid}: not finished after {args.timeout:.0f} s")
                ok = False
                continue
            ok &= _print_study(uid, info)
        print(f"\nresult objects are in {output}/ (one folder per study and series)")
        print("made with the DEMO bundle: random weights, not for clinical use")
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _print_study(uid: str, info: dict) -> bool:
    print(f"\nstudy {uid}: {info['status']}" + (f" ({info['reason']})" if info["reason"] else ""))
    ok = info["status"] == "done"
    for job in info["jobs"]:
        print(
            f"  job {job['id']} pipeline {job['pipeline']}: {job['status']}, "
            f"triage {job['triage']}" + (f", error: {job['error']}" if job["error"] else "")
        )
        for res in job["results"]:
            summ = res["summary"]
            print(
                f"    {res['kind'].upper():3} {summ.get('sop_class')}: "
                f"series '{summ.get('series_description')}' ({res['series_instance_uid']})"
            )
            for f in summ.get("findings", []):
                mark = "PRESENT" if f["present"] else "absent"
                print(f"          {f['label']:<18} p={f['probability']:.3f} {mark}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
