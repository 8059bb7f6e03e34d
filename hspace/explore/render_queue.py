"""A render queue for interactive editing: one worker thread, coalesced batches, latest request wins.

A slider drag sends many render requests a second; rendering each one in turn would leave the
image further and further behind the slider. Instead:

- every request carries its client's id and a sequence number; a new request from a client
  supersedes that client's pending ones (they are answered :data:`SUPERSEDED` at once, never
  rendered), and a request older than one already seen is answered :data:`SUPERSEDED` on arrival;
- the worker takes every pending request at once and hands those with equal ``key`` (requests
  that can share a sampler batch) to ``render_batch`` together, so several clients, or one
  client's seeds, cost one batched sampler call;
- while a slider moves, the batch being rendered runs to the end, so the page keeps getting
  images during a drag; when the slider is released, :meth:`RenderQueue.preempt` (or a request
  submitted with ``preempt=True``) cancels the batch in progress if it only holds that client's
  older requests, so the released position is rendered next instead of after it. ``render_batch``
  gets a :class:`threading.Event` to check between U-Net calls and raises :class:`RenderCancelled`
  when it is set;
- other model work (inversions, h-swaps) runs as plain tasks on the same thread, one at a time
  between render batches, so the model is never used by two threads at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SUPERSEDED", "RenderCancelled", "RenderQueue", "RenderStats"]


class _Superseded:
    """The answer to a request that a newer one from the same client replaced."""

    def __repr__(self) -> str:
        return "SUPERSEDED"


#: Result of a request that was dropped because its client sent a newer one.
SUPERSEDED = _Superseded()


class RenderCancelled(Exception):
    """Raised by ``render_batch`` when its cancel event was set: the batch's requests are superseded."""


@dataclass
class _Request:
    client: str
    seq: int
    key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)


@dataclass
class RenderStats:
    """Counters since start: requests rendered and dropped, batched sampler calls, tasks run."""

    rendered: int = 0
    superseded: int = 0
    cancelled_batches: int = 0
    batches: int = 0
    largest_batch: int = 0
    tasks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RenderQueue:
    """Coalesces render requests into batches on one worker thread (see the module docstring).

    ``render_batch(key, payloads, cancel)`` renders requests that share ``key`` in one go and
    returns one result per payload, in order; it may stop early with :class:`RenderCancelled` once
    ``cancel`` (a :class:`threading.Event`) is set. It runs on the worker thread only.
    """

    def __init__(
        self,
        render_batch: Callable[[Hashable, Sequence[Any], threading.Event], Sequence[Any]],
        *,
        name: str = "hspace-render",
    ) -> None:
        self._render_batch = render_batch
        self._running: list[_Request] = []
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()
        self._latest: dict[str, int] = {}
        self._closed = False
        self.stats = RenderStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, client: str, seq: int, key: Hashable, payload: Any, *, preempt: bool = False) -> Future:
        """Queue a render; the future resolves to its result or to :data:`SUPERSEDED`.

        preempt: also cancel the batch in progress if it only holds this client's older requests.
        """
        request = _Request(client, int(seq), key, payload)
        with self._cond:
            self._check_open()
            latest = self._latest.get(client)
            if latest is not None and request.seq <= latest:
                self.stats.superseded += 1
                request.future.set_result(SUPERSEDED)
                return request.future
            self._latest[client] = request.seq
            keep = []
            for old in self._pending:
                if old.client == client:
                    self.stats.superseded += 1
                    old.future.set_result(SUPERSEDED)
                else:
                    keep.append(old)
            self._pending = keep + [request]
            if preempt:
                self._preempt_locked(client, request.seq)
            self._cond.notify()
        return request.future

    def preempt(self, client: str, seq: int) -> bool:
        """Cancel the batch being rendered if every request in it is ``client``'s and older than
        ``seq`` (its answers become :data:`SUPERSEDED`); True if it was cancelled."""
        with self._cond:
            return self._preempt_locked(client, int(seq))

    def _preempt_locked(self, client: str, seq: int) -> bool:
        running = self._running
        if running and all(r.client == client and r.seq < seq for r in running):
            self._cancel.set()
            return True
        return False

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the worker thread (after the renders pending now)."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._tasks.append((lambda: fn(*args, **kwargs), future))
            self._cond.notify()
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after what it is doing; pending requests fail with RuntimeError."""
        with self._cond:
            self._closed = True
            dropped = [r.future for r in self._pending] + [f for _, f in self._tasks]
            self._pending, self._tasks = [], deque()
            self._cond.notify()
        for future in dropped:
            future.set_exception(RuntimeError("the render queue was closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the render queue is closed")

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._pending or self._tasks):
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._pending = self._pending, []
                task = self._tasks.popleft() if not batch and self._tasks else None
            if batch:
                self._render(batch)
            elif task is not None:
                self._run_task(*task)

    def _render(self, batch: list[_Request]) -> None:
        groups: dict[Hashable, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.key, []).append(request)
        for key, requests in groups.items():
            live = [r for r in requests if r.future.set_running_or_notify_cancel()]
            if live:
                self._render_group(key, live)

    def _render_group(self, key: Hashable, live: list[_Request]) -> None:
        with self._cond:
            self._running = live
            self._cancel.clear()
        cancelled = False
        try:
            results = list(self._render_batch(key, [r.payload for r in live], self._cancel))
            if len(results) != len(live):
                raise RuntimeError(f"render_batch returned {len(results)} results for {len(live)} requests")
        except RenderCancelled:
            cancelled = True
            self.stats.cancelled_batches += 1
            self.stats.superseded += len(live)
            results = [SUPERSEDED] * len(live)
        except Exception as error:  # noqa: BLE001 - every waiting request gets the error
            for r in live:
                r.future.set_exception(error)
            return
        finally:
            with self._cond:
                self._running = []
        if not cancelled:
            self.stats.batches += 1
            self.stats.rendered += len(live)
            self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        for r, result in zip(live, results, strict=True):
            r.future.set_result(result)

    def _run_task(self, fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self.stats.tasks += 1
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
            return
        future.set_result(result)
