"""The worker's bounded three-stage pipeline: decode -> model -> outputs, overlapped.

While the model runs batch n (in the calling thread), the decode pool's processes decode and
letterbox the images of batch n+1 (`workers.decode_pool.DecodePool`, at most ``pool.prefetch``
ahead) and one writer thread writes the outputs of the groups finished with batch n-1. A group is
one job's images: it goes to the writer once every image of it is through the model (or was
left out), in the order the groups came.

Memory stays bounded under any backlog: the pool holds at most ``pool.prefetch`` images, the
model one batch of ``batch_size``, the writer queue at most ``write_queue`` finished groups plus
the one being written; sources are read (fetched) only when the pool has room for them. The
high-water marks are in `OverlapStats`.

`run_overlapped` knows nothing of jobs or the database: the caller's callbacks read a group's
sources (``sources``), run one model batch (``infer``) and write a finished group (``write``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from workers.decode_pool import Decoded, DecodePool

log = logging.getLogger(__name__)

__all__ = ["Group", "OverlapStats", "run_overlapped"]

K = TypeVar("K")


@dataclass
class Group(Generic[K]):
    """One group's images through the pipeline (``key``: the caller's, e.g. a claimed job)."""

    key: K
    decoded: list[Decoded] = field(default_factory=list)  # in source order, failures included
    results: dict[str, Any] = field(default_factory=dict)  # sop -> the model's result
    model_errors: dict[str, BaseException] = field(default_factory=dict)  # refused by the model
    error: BaseException | None = None  # its sources could not all be read (e.g. a fetch)
    expected: int = 0  # sources sent to the pool
    done: int = 0  # of which through the model or left out
    closed: bool = False  # all its sources sent


@dataclass
class OverlapStats:
    images: int = 0  # decoded and through the model
    groups: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0  # summed over the pool's processes
    preprocess_s: float = 0.0  # letterboxing, summed over the pool's processes
    read_s: float = 0.0  # reading the sources (the caller's ``sources``: fetch, header parse)
    model_s: float = 0.0  # the calling thread in ``infer``
    write_s: float = 0.0  # the writer thread in ``write``
    wait_s: float = 0.0  # the calling thread waiting for decoded images
    pool_high_water: int = 0  # most images the pool held at once (<= pool.prefetch)
    batch_high_water: int = 0  # largest model batch (<= batch_size)
    write_queue_high_water: int = 0  # most finished groups waiting for the writer
    write_errors: int = 0

    def shares(self) -> dict[str, float]:
        """Each stage's share of the summed stage time (the stages overlap: they can sum to
        more than the wall time)."""
        stages = {
            "read": self.read_s,
            "decode": self.decode_s,
            "preprocess": self.preprocess_s,
            "model": self.model_s,
            "writers": self.write_s,
        }
        total = sum(stages.values()) or 1.0
        return {k: v / total for k, v in stages.items()}


class _Writer(threading.Thread):
    """Writes finished groups in order from a bounded queue (``put`` blocks when it is full)."""

    _STOP = object()

    def __init__(self, write: Callable[[Group[Any]], None], size: int, stats: OverlapStats):
        super().__init__(name="outputs-writer", daemon=True)
        self.write = write
        self.stats = stats
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self.lock = threading.Lock()

    def put(self, group: Group[Any]) -> None:
        self.queue.put(group)
        with self.lock:
            self.stats.write_queue_high_water = max(
                self.stats.write_queue_high_water, self.queue.qsize()
            )

    def stop(self) -> None:
        self.queue.put(self._STOP)
        self.join()

    def run(self) -> None:
        while True:
            group = self.queue.get()
            if group is self._STOP:
                return
            t0 = time.perf_counter()
            try:
                self.write(group)
            except Exception:  # the caller's write handles its own errors; never stop here
                self.stats.write_errors += 1
                log.exception("writing the outputs of a group failed")
            finally:
                self.stats.write_s += time.perf_counter() - t0


def run_overlapped(
    groups: Iterable[K],
    sources: Callable[[K], Iterable[tuple[str, bytes]]],
    pool: DecodePool,
    infer: Callable[[list[Any]], list[Any]],
    write: Callable[[Group[K]], None],
    *,
    batch_size: int,
    write_queue: int = 2,
    before_group: Callable[[K], None] | None = None,
) -> OverlapStats:
    """Decode every group's sources in ``pool``, run ``infer`` (prepared images -> one result
    each, in order) on batches of up to ``batch_size`` images across groups, and ``write`` each
    group once all of its images are through, in a writer thread. A batch that ``infer`` cannot
    take runs image by image, so that one bad image is left out (``Group.model_errors``) and
    the others are analysed. ``before_group`` runs (in this thread) before a group's first
    source is read. Returns when every group is written."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if write_queue < 1:
        raise ValueError("write_queue must be at least 1")
    stats = OverlapStats()
    t_start = time.perf_counter()
    order: deque[Group[K]] = deque()  # the group of each source sent to the pool, in order
    unfinished: deque[Group[K]] = deque()  # groups not yet handed to the writer, in order
    writer = _Writer(write, write_queue, stats)  # type: ignore[arg-type]
    writer.start()

    def feed() -> Iterator[tuple[str, bytes]]:
        for key in groups:
            if before_group is not None:
                before_group(key)
            group: Group[K] = Group(key)
            unfinished.append(group)
            stats.groups += 1
            it = iter(sources(key))
            while True:
                t0 = time.perf_counter()
                try:
                    sop, blob = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # the group fails; its images sent so far still return
                    group.error = exc
                    break
                finally:
                    stats.read_s += time.perf_counter() - t0
                group.expected += 1
                order.append(group)
                yield sop, blob
            group.closed = True

    def hand_on_finished() -> None:
        while unfinished and unfinished[0].closed and unfinished[0].done == unfinished[0].expected:
            writer.put(unfinished.popleft())

    def run_batch(batch: list[tuple[Group[K], Any]]) -> None:
        if not batch:
            return
        stats.batch_high_water = max(stats.batch_high_water, len(batch))
        images = [image for _, image in batch]
        t0 = time.perf_counter()
        try:
            results: list[Any | None] = list(infer(images))
            if len(results) != len(images):
                raise RuntimeError(f"{len(results)} results for {len(images)} images")
        except Exception as exc:
            if len(images) == 1:
                batch[0][0].model_errors[images[0].sop] = exc
                results = [None]
            else:
                log.warning("model pass failed (%s): the images one by one", type(exc).__name__)
                results = []
                for group, image in batch:
                    try:
                        (one,) = infer([image])
                    except Exception as refused:
                        group.model_errors[image.sop] = refused
                        one = None
                    results.append(one)
        stats.model_s += time.perf_counter() - t0
        for (group, image), result in zip(batch, results, strict=True):
            if result is not None:
                group.results[image.sop] = result
                stats.images += 1
            group.done += 1

    try:
        batch: list[tuple[Group[K], Any]] = []
        decoded = pool.imap(feed())
        while True:
            t0 = time.perf_counter()
            try:
                d = next(decoded)
            except StopIteration:
                break
            finally:
                stats.wait_s += time.perf_counter() - t0
            group = order.popleft()
            group.decoded.append(d)
            stats.decode_s += d.decode_s
            stats.preprocess_s += d.preprocess_s
            if d.image is None:
                group.done += 1
            else:
                batch.append((group, d.image))
            if len(batch) >= batch_size:
                run_batch(batch)
                batch = []
            hand_on_finished()
        run_batch(batch)
        hand_on_finished()
        stats.pool_high_water = pool.high_water
    finally:
        writer.stop()
    if unfinished:  # cannot happen: every group closes once the feed is exhausted
        raise RuntimeError(f"{len(unfinished)} groups were not written")
    stats.wall_s = time.perf_counter() - t_start
    return stats
