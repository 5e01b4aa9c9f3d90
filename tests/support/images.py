"""Small test images cut from pydicom's NEMA radiographs.

The e2e tests about scheduling, fetching and delivery do not need full-size (1760 x 1760)
radiographs: a reduced copy goes through the same decode, model and writer code, in a fraction
of the time on a 2-core machine (decoding and the full-resolution output objects dominate a job).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid


def reduced_radiograph(
    out: Path,
    study_uid: str,
    *,
    name: str = "RG3_UNCR.dcm",
    factor: int = 4,
    sop_uid: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """NEMA radiograph ``name`` (an uncompressed CR) shrunk ``factor`` times in each direction
    (every ``factor``-th pixel, pixel spacing scaled to match) and stored as JPEG 2000 lossless
    (the production case) in a new study/series/instance; written to ``out``."""
    from tests.conftest import sample_path

    ds = dcmread(sample_path(name))
    small = np.ascontiguousarray(ds.pixel_array[::factor, ::factor])
    ds.Rows, ds.Columns = small.shape
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if key in ds:
            ds[key].value = [float(v) * factor for v in ds[key].value]
    ds.PixelData = small.tobytes()
    ds.compress(JPEG2000Lossless, small)  # (it gives the instance a UID of its own: set below)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out
