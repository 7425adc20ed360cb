"""Alert delivery to a webhook, against a local HTTP server: JSON POST, retries with backoff,
final failures and a full queue counted, the step never blocked."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedgspo.config import ConfigError, load_config
from fedgspo.entities.events import NullEventBus
from fedgspo.telemetry.alerts import AlertMonitor, AlertRule, AlertsConfig
from fedgspo.telemetry.webhook import WebhookSender


class Hook:
    """A local webhook: answers each POST with the next status of ``statuses`` (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.bodies, self.headers = list(statuses), [], []
        self.gate = threading.Event()
        self.gate.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hook.gate.wait()
                hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                hook.headers.append(dict(self.headers))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook([503, 500])
    yield server
    server.close()


def test_json_post_retried_with_backoff_until_delivered(hook):
    sender = WebhookSender(hook.url, retries=3, backoff_s=0.01)
    assert sender.send({"rule": "reward_drop", "step": 7})
    assert sender.close(timeout=10)
    assert hook.bodies == [{"rule": "reward_drop", "step": 7}] * 3  # 503, 500, then 200
    assert hook.headers[0]["Content-Type"] == "application/json"
    assert sender.stats() == {"sent": 1, "failed": 0, "dropped": 0, "retries": 2, "queue_depth": 0}


def test_a_client_error_is_final_and_an_unreachable_hook_fails_after_the_retries():
    rejecting = Hook([400])
    sender = WebhookSender(rejecting.url, retries=3, backoff_s=0.01)
    sender.send({"x": 1})
    sender.close(timeout=10)
    rejecting.close()
    assert len(rejecting.bodies) == 1 and sender.stats()["failed"] == 1 and sender.stats()["retries"] == 0

    gone = WebhookSender(rejecting.url, retries=2, backoff_s=0.01, timeout_s=1)  # server closed
    gone.send({"x": 1})
    gone.close(timeout=10)
    assert gone.stats()["failed"] == 1 and gone.stats()["retries"] == 2 and gone.stats()["sent"] == 0


def test_a_full_queue_drops_without_blocking(hook):
    hook.statuses.clear()
    hook.gate.clear()  # the hook hangs: deliveries pile up
    sender = WebhookSender(hook.url, max_queue=1, timeout_s=5)
    results = [sender.send({"n": n}) for n in range(3)]
    assert results[0] and not results[2] and sender.stats()["dropped"] >= 1
    hook.gate.set()
    sender.close(timeout=10)
    assert sender.stats()["sent"] + sender.stats()["dropped"] == 3


def test_an_alert_that_fires_is_posted(tmp_path, hook):
    hook.statuses.clear()
    cfg = AlertsConfig(rules=[AlertRule(name="low_reward", metric="reward_mean", condition="below", threshold=0.5)],
                       webhook_url=hook.url, webhook_backoff_s=0.01)
    (tmp_path / "run-a").mkdir()
    monitor = AlertMonitor(cfg, tmp_path / "run-a", NullEventBus())
    monitor.observe({"step": 3, "reward_mean": 0.25})
    monitor.observe({"step": 4, "reward_mean": 0.25})  # still firing: one alert, one POST
    monitor.close()
    assert len(hook.bodies) == 1
    body = hook.bodies[0]
    assert body["run"] == "run-a" and body["step"] == 3 and body["rule"] == "low_reward" and body["rank"] is None
    assert body["value"] == 0.25 and body["threshold"] == 0.5 and "low_reward" in body["text"]
    assert monitor.counters() == {"webhook_sent": 1, "webhook_failed": 0, "webhook_dropped": 0}


def test_webhook_url_must_be_http():
    with pytest.raises(ConfigError, match="alerts.webhook_url"):
        load_config(None, ["alerts.webhook_url=ftp://example.org/hook"])
    assert load_config(None, ["alerts.webhook_url=https://example.org/hook"]).alerts.webhook_url
