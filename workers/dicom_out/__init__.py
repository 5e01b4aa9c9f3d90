"""DICOM writers for model results: one module per IOD.

- :func:`build_sr` (``sr.py``): Comprehensive 3D SR, TID 1500 measurement report of findings;
- :func:`build_seg` (``seg.py``): BINARY Segmentation, one segment per class;
- :func:`build_heatmap_sc` (``sc.py``): RGB Secondary Capture with the heatmap burned in.

Each takes its source dataset(s), the result, the :class:`~workers.results.AlgorithmInfo` and an
explicit :class:`~workers.results.OutputIdentity`, and returns a ``pydicom.Dataset`` that
dciodvfy reports no errors on.
"""

from workers.dicom_out.sc import build_heatmap_sc
from workers.dicom_out.seg import build_seg
from workers.dicom_out.sr import build_sr

__all__ = ["build_heatmap_sc", "build_seg", "build_sr"]
