"""DICOM writers for model results: one module per IOD.

- :func:`build_sr` (``sr.py``): Comprehensive 3D SR, TID 1500 measurement report of findings;
- :func:`build_text_sr` (``text_sr.py``): Basic Text SR of the same, for PACS without TID 1500;
- :func:`build_seg` (``seg.py``): BINARY or FRACTIONAL Segmentation, one segment per class;
- :func:`build_heatmap_sc` (``sc.py``): RGB Secondary Capture with the heatmap burned in;
- :func:`build_parametric_map` (``pm.py``): float Parametric Map of the heatmap;
- :func:`build_key_objects` (``ko.py``): Key Object Selection of the images with findings.

Each takes its source dataset(s), the result, the :class:`~workers.results.AlgorithmInfo` and an
explicit :class:`~workers.results.OutputIdentity`, and returns a ``pydicom.Dataset`` that
dciodvfy reports no errors on. ``outputs.py`` decides which objects a job produces and their
series and UIDs (:func:`~workers.dicom_out.outputs.build_outputs`).
"""

from workers.dicom_out.ko import build_key_objects
from workers.dicom_out.pm import build_parametric_map
from workers.dicom_out.sc import build_heatmap_sc
from workers.dicom_out.seg import build_seg
from workers.dicom_out.sr import build_sr
from workers.dicom_out.text_sr import build_text_sr

__all__ = [
    "build_heatmap_sc",
    "build_key_objects",
    "build_parametric_map",
    "build_seg",
    "build_sr",
    "build_text_sr",
]
