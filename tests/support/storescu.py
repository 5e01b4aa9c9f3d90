"""Reading dcmtk's storescu verbose log (`-v`) in tests."""

from __future__ import annotations

import re


def acknowledged(log_text: str) -> list[str]:
    """Files storescu was told were stored (a Success response), from its verbose log, in
    the order it sent them."""
    acked, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked
