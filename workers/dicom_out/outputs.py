"""All output objects for one job, in one place: which objects, their series and their UIDs.

UIDs derive from (source or study UID, bundle name, bundle version, study version, kind), so a
re-run of the same job produces the same objects and the PACS keeps one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from pacs_agent.uids import derive_uid
from workers.results import AlgorithmInfo, ImageResult, OutputIdentity

SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002
SC_SERIES_NUMBER = 9003


@dataclass(frozen=True)
class OutputOptions:
    """Which objects to produce; read from settings by the pipeline."""

    @classmethod
    def from_settings(cls, settings: Any) -> OutputOptions:
        return cls()


def build_outputs(
    sources: list[Dataset],
    results: list[ImageResult],
    algorithm: AlgorithmInfo,
    study_version: int,
    options: OutputOptions | None = None,
) -> list[tuple[str, Dataset, str | None]]:
    """All output objects for one study: (kind, dataset, source SOP UID)."""
    from workers.dicom_out.sc import build_heatmap_sc
    from workers.dicom_out.seg import build_seg
    from workers.dicom_out.sr import build_sr

    study_uid = str(sources[0].StudyInstanceUID)
    key = (algorithm.name, algorithm.version, str(study_version))
    suffix = " (DEMO)" if algorithm.is_demo else ""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    outputs: list[tuple[str, Dataset, str | None]] = []
    seg_series = derive_uid(study_uid, *key, "seg-series")
    sc_series = derive_uid(study_uid, *key, "sc-series")
    for n, r in enumerate(results, start=1):
        src = by_uid[r.source_sop_instance_uid]
        seg = build_seg(
            src,
            r.masks,
            r.segment_labels,
            algorithm,
            OutputIdentity(
                seg_series,
                derive_uid(r.source_sop_instance_uid, *key, "seg"),
                SEG_SERIES_NUMBER,
                n,
                f"AI segmentation{suffix}",
            ),
        )
        outputs.append(("seg", seg, r.source_sop_instance_uid))
        sc = build_heatmap_sc(
            src,
            r.display,
            r.heatmap,
            algorithm,
            OutputIdentity(
                sc_series,
                derive_uid(r.source_sop_instance_uid, *key, "sc"),
                SC_SERIES_NUMBER,
                n,
                f"AI heatmap{suffix}",
            ),
        )
        outputs.append(("sc", sc, r.source_sop_instance_uid))
    findings = [f for r in results for f in r.findings]
    sr = build_sr(
        [by_uid[r.source_sop_instance_uid] for r in results],
        findings,
        algorithm,
        OutputIdentity(
            derive_uid(study_uid, *key, "sr-series"),
            derive_uid(study_uid, *key, "sr"),
            SR_SERIES_NUMBER,
            1,
            f"AI findings{suffix}",
        ),
    )
    outputs.insert(0, ("sr", sr, None))
    return outputs
