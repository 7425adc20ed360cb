"""Delivery of JSON payloads to a webhook URL on a background thread (standard library only).

:class:`WebhookSender` is how alerts leave the machine (``alerts.webhook_url``): :meth:`send`
queues one payload and returns at once; a daemon thread POSTs each payload as
``Content-Type: application/json``, one at a time in order, retrying with exponential backoff.

Failure behaviour:

* A connection error, a timeout, HTTP 408, 429 or 5xx is retried up to ``retries`` times,
  waiting ``backoff_s``, then twice that, and so on (at most 60 s between tries); any other
  HTTP error is final. A payload that is not delivered is counted (``stats()["failed"]``) and
  logged once per sender without the URL (it may carry a token); nothing is raised.
* A full queue drops the new payload, counted (``stats()["dropped"]``), and :meth:`send`
  returns ``False``; it never blocks.
* :meth:`close` waits up to its timeout for queued payloads, then stops: payloads still
  queued or between retries are counted as failed.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
RETRY_STATUS = frozenset({408, 429})


def retryable(status: int) -> bool:
    """Whether an HTTP status is worth another try (server errors, timeouts, rate limits)."""
    return status >= 500 or status in RETRY_STATUS


class WebhookSender:
    """POST JSON payloads to ``url`` from a daemon thread.

    Args:
        url: an ``http://`` or ``https://`` URL.
        retries: further tries after the first one fails.
        backoff_s: wait before the first retry; doubled for each further one.
        timeout_s: per-request timeout.
        max_queue: payloads waiting before :meth:`send` drops new ones.
    """

    def __init__(self, url: str, *, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 5.0,
                 max_queue: int = 256) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("webhook URL must start with http:// or https://")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0 or max_queue < 1:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0, max_queue >= 1")
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self._max_queue = max_queue
        self._pending: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._warned = False
        self._counts = {"sent": 0, "failed": 0, "dropped": 0, "retries": 0}
        self._thread = threading.Thread(target=self._run, name="fedgspo-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> bool:
        """Queue ``payload`` (JSON-serialisable; other values as ``str``); ``False`` if dropped
        because the queue was full or the sender is closed."""
        body = json.dumps(payload, default=str).encode()
        with self._lock:
            if self._stop.is_set() or len(self._pending) >= self._max_queue:
                self._counts["dropped"] += 1
                return False
            self._pending.append(body)
            self._idle.clear()
        self._wake.set()
        return True

    def stats(self) -> dict[str, int]:
        """sent, failed, dropped, retries and queue_depth."""
        with self._lock:
            return {**self._counts, "queue_depth": len(self._pending)}

    def close(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty, then stop; returns whether
        everything queued was handled (delivered or finally failed). Idempotent."""
        handled = self._idle.wait(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(self.timeout_s)
        with self._lock:
            self._counts["failed"] += len(self._pending)
            self._pending.clear()
        return handled

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._stop.is_set():
                with self._lock:
                    if not self._pending:
                        self._idle.set()
                        break
                    body = self._pending.popleft()
                self._deliver(body)

    def _deliver(self, body: bytes) -> None:
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                if self._stop.wait(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)):
                    break
            try:
                request = urllib.request.Request(self.url, data=body, method="POST", headers={
                    "Content-Type": "application/json", "User-Agent": "fedgspo"})
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self._count("sent")
                return
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}"
                if not retryable(err.code):
                    break
            except (urllib.error.URLError, OSError) as err:
                reason = type(err).__name__
        self._count("failed")
        if not self._warned:
            self._warned = True
            host = urllib.parse.urlsplit(self.url).hostname
            log.warning("webhook delivery to %s failed (%s); further failures are only counted", host, reason)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1
