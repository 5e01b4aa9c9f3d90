"""Decode and letterbox images in other processes while the model runs, and GPU decoding.

- `DecodePool(size, workers)`: `imap(sources)` decodes DICOM files or bytes in a process pool
  (a thread pool when decoding on the GPU) and yields `PreparedImage`s in order with a bounded
  look-ahead, so that `ModelRunner.run_prepared` infers on batch k while batch k+1 decodes.
  Decoding (JPEG 2000 especially) is the slowest CPU stage of the pipeline; see
  docs/benchmarks.md.
- `decode_auto(ds)`: NVIDIA nvImageCodec (`nvidia.nvimgcodec`) decodes JPEG / JPEG 2000 /
  HTJ2K frames on the GPU when it is importable and a GPU answers; anything else, or any error
  from it, falls back to the CPU decoders of pydicom. Both give exactly `imaging.decode`'s
  output for lossless data (the same `imaging.decode_stored` runs after either).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

from workers.imaging import (
    ImageError,
    analysed_frame,
    decode,
    decode_reduced,
    decode_stored,
    letterbox,
)

log = logging.getLogger(__name__)

__all__ = [
    "DecodePool",
    "Decoded",
    "decode_auto",
    "decode_gpu",
    "nvimgcodec_available",
]

GPU_TRANSFER_SYNTAXES = frozenset(
    {
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        JPEGBaseline8Bit,
        JPEGLossless,
        JPEGLosslessSV1,
    }
)

_nvimgcodec_state: dict[str, Any] = {}


class GpuDecodeUnavailable(RuntimeError):
    """nvImageCodec cannot decode this dataset here (not installed, no GPU, unsupported)."""


def _nvimgcodec() -> tuple[Any, Any] | None:
    """(module, decoder) or None when nvImageCodec is not importable or finds no GPU."""
    if "ok" not in _nvimgcodec_state:
        _nvimgcodec_state["ok"] = False
        try:
            from nvidia import nvimgcodec  # type: ignore[import-not-found]

            decoder = nvimgcodec.Decoder()
            _nvimgcodec_state.update(ok=True, module=nvimgcodec, decoder=decoder)
        except Exception as exc:  # ImportError, or no CUDA device / driver
            _nvimgcodec_state["reason"] = f"{type(exc).__name__}: {exc}"
            log.info("nvImageCodec GPU decoding unavailable (%s)", _nvimgcodec_state["reason"])
    if not _nvimgcodec_state["ok"]:
        return None
    return _nvimgcodec_state["module"], _nvimgcodec_state["decoder"]


def nvimgcodec_available() -> bool:
    return _nvimgcodec() is not None


def nvimgcodec_unavailable_reason() -> str | None:
    return None if nvimgcodec_available() else str(_nvimgcodec_state.get("reason", "unknown"))


def decode_gpu(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """`imaging.decode(ds, frame)` with the compressed bytes of that one frame (1-based; by
    default `imaging.analysed_frame(ds)`, the same frame the CPU path decodes) decoded by
    nvImageCodec. Raises `GpuDecodeUnavailable` when that is not possible for this dataset here.
    """
    nv = _nvimgcodec()
    if nv is None:
        raise GpuDecodeUnavailable(f"nvImageCodec: {nvimgcodec_unavailable_reason()}")
    module, decoder = nv
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax not in GPU_TRANSFER_SYNTAXES:
        raise GpuDecodeUnavailable(f"transfer syntax {tsyntax} is not decoded on the GPU")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise GpuDecodeUnavailable("only monochrome images are decoded on the GPU")
    if "PixelData" not in ds:
        raise ImageError("no pixel data")
    from pydicom.encaps import generate_frames

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is None:
        frame = analysed_frame(ds)
    index = (frame or 1) - 1
    if not 0 <= index < n_frames:
        raise ImageError(f"frame {frame} does not exist: the image has {n_frames} frame(s)")
    try:
        frames = generate_frames(ds.PixelData, number_of_frames=n_frames)
        for _ in range(index):  # the analysed frame's fragments, not the first frame's
            next(frames)
        encoded = next(frames)
        params = module.DecodeParams(allow_any_depth=True, color_spec=module.ColorSpec.UNCHANGED)
        image = decoder.decode(encoded, params=params)
        if image is None:
            raise RuntimeError("decoder returned nothing")
        arr = np.asarray(image.cpu())
    except Exception as exc:
        raise GpuDecodeUnavailable(f"nvImageCodec failed: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    arr = _signed(ds, arr)
    return decode_stored(ds, arr)


def _signed(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """Two's complement of `BitsStored` bits when the data are signed but came back unsigned."""
    if int(ds.get("PixelRepresentation", 0) or 0) != 1 or arr.dtype.kind != "u":
        return arr
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 16)
    wide = arr.astype(np.int32)
    wide = np.where(wide >= 1 << (bits - 1), wide - (1 << bits), wide)
    return wide.astype(np.int16 if bits <= 16 else np.int32)


def decode_auto(
    ds: Dataset, prefer_gpu: bool = True, frame: int | None = None
) -> tuple[np.ndarray, str]:
    """(decoded image, "gpu" or "cpu"): the GPU when it can, else the CPU; one frame, ``frame``
    (1-based), by default `imaging.analysed_frame(ds)`, on either path."""
    if frame is None:
        frame = analysed_frame(ds)
    if prefer_gpu:
        try:
            return decode_gpu(ds, frame), "gpu"
        except GpuDecodeUnavailable as exc:
            log.debug("CPU decode: %s", exc)
    return decode(ds, frame), "cpu"


# --------------------------------------------------------------------------------------------
# the pool


@dataclass
class Decoded:
    """One source through the pool: a prepared image, or the reason it has none."""

    sop: str
    image: Any  # workers.models.runner.PreparedImage | None (plain data, picklable)
    error: str | None
    decode_s: float  # seconds spent decoding (in the worker)
    preprocess_s: float  # seconds spent letterboxing (in the worker)
    backend: str = "cpu"
    frame: int | None = None  # the analysed 1-based frame of a multi-frame source
    pid: int = 0  # the process that decoded it


Source = tuple[str, "bytes | str | os.PathLike[str]"]


def _worker_init() -> None:
    # One intra-op thread per worker process: the pool is the parallelism.
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # torch is always here on a worker; be safe anyway
        pass


def prepare_source(
    sop: str, source: Any, size: int, prefer_gpu: bool = False, reduced: bool = False
) -> Decoded:
    """Read, decode and letterbox one DICOM (path or bytes). Runs in a pool worker.

    ``reduced``: a JPEG 2000 image much larger than the model input is decoded at a reduced
    resolution (`imaging.decode_reduced`; backend "cpu-reduced"); the prepared image's
    ``display`` is then that reduced image (the writers resample it to the source's size) and
    its transform is the source's."""
    from workers.models.runner import PreparedImage

    t0 = time.perf_counter()
    pid = os.getpid()
    frame: int | None = None
    try:
        fh = BytesIO(source) if isinstance(source, bytes | bytearray) else Path(source)
        ds = dcmread(fh)
        frame = analysed_frame(ds)
        image = None
        if reduced and not prefer_gpu:
            image, backend = decode_reduced(ds, size, frame), "cpu-reduced"
        if image is None:
            image, backend = decode_auto(ds, prefer_gpu=prefer_gpu, frame=frame)
        source_shape = (int(ds.Rows), int(ds.Columns))
    except ImageError as exc:
        return Decoded(sop, None, str(exc), time.perf_counter() - t0, 0.0, frame=frame, pid=pid)
    except Exception as exc:  # unreadable file; pydicom's text can quote header values
        why = f"cannot decode: {type(exc).__name__}"
        return Decoded(sop, None, why, time.perf_counter() - t0, 0.0, frame=frame, pid=pid)
    t1 = time.perf_counter()
    try:
        boxed, transform = letterbox(image, size, source_shape=source_shape)
    except Exception as exc:
        why = f"cannot letterbox: {type(exc).__name__}"
        return Decoded(sop, None, why, t1 - t0, time.perf_counter() - t1, backend, frame, pid)
    prepared = PreparedImage(sop=sop, display=image, boxed=boxed, transform=transform)
    return Decoded(
        sop, prepared, None, t1 - t0, time.perf_counter() - t1, backend, frame=frame, pid=pid
    )


class DecodePool:
    """Decode + letterbox in `workers` processes (threads when `prefer_gpu`), in order, at most
    `prefetch` sources ahead of the consumer. Use as a context manager."""

    def __init__(
        self,
        size: int,
        workers: int = 2,
        *,
        prefetch: int | None = None,
        prefer_gpu: bool = False,
        start_method: str | None = None,
        reduced: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.size = size
        self.reduced = reduced  # `prepare_source`'s reduced-resolution JPEG 2000 decoding
        self.workers = workers
        self.prefetch = prefetch or 2 * workers
        # The most sources decoding or decoded but not yet taken (at most ``prefetch``): what
        # the pool holds in memory at once, whatever the backlog.
        self.high_water = 0
        self.prefer_gpu = prefer_gpu and nvimgcodec_available()
        self._executor: Executor
        if self.prefer_gpu:
            # CUDA and fork do not mix; nvImageCodec releases the GIL, threads suffice.
            self._executor = ThreadPoolExecutor(max_workers=workers)
        else:
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=mp.get_context(start_method or _default_start_method()),
                initializer=_worker_init,
            )

    def imap(self, sources: Iterable[Source]) -> Iterator[Decoded]:
        pending: deque[Future[Decoded]] = deque()
        it = iter(sources)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.prefetch:
                try:
                    sop, src = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if not isinstance(src, bytes | bytearray):
                    src = str(src)
                pending.append(
                    self._executor.submit(
                        prepare_source, sop, src, self.size, self.prefer_gpu, self.reduced
                    )
                )
                self.high_water = max(self.high_water, len(pending))
            if not pending:
                return
            yield pending.popleft().result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_start_method() -> str:
    """fork where it is safe (Linux, CUDA not initialised in this process), else spawn."""
    if "fork" not in mp.get_all_start_methods():
        return "spawn"
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return "spawn"
    except Exception:
        pass
    return "fork"
