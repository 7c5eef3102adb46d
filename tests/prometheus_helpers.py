"""A real Prometheus for the metrics tests: Debian's ``prometheus`` package (``make
prometheus`` installs it as root, as ``make browser`` does Chromium), started on a
loopback port with a scrape config pointing at the test server, queried through its HTTP
API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

from tests.server_helpers import free_port

PROMETHEUS = "prometheus"


def require_prometheus() -> str:
    """The ``prometheus`` binary, or a skip naming what to install."""
    path = shutil.which(PROMETHEUS)
    if path is None:
        pytest.skip("no prometheus server (Debian package 'prometheus'; `make prometheus` "
                    "installs it as root)")
    return path


class Prometheus:
    """``prometheus`` scraping ``targets`` (``host:port``) every ``interval_s``."""

    def __init__(self, root: Path, targets: list[str], interval_s: float = 1.0) -> None:
        self.binary = require_prometheus()
        self.root = root
        self.targets = targets
        self.interval_s = interval_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "prometheus.yml"
        cfg.write_text(json.dumps({
            "global": {"scrape_interval": f"{round(self.interval_s * 1000)}ms",
                       "evaluation_interval": f"{round(self.interval_s * 1000)}ms"},
            "scrape_configs": [{"job_name": "vllm", "static_configs": [
                {"targets": self.targets}]}]}))
        self.port = free_port()
        log = open(self.root / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prometheus not ready: {self.tail()}")

    def tail(self) -> str:
        try:
            return (self.root / "prometheus.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """The result vector of an instant query (``at``: unix time, default now)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        with urllib.request.urlopen(f"{self.url}/api/v1/query?"
                                    f"{urllib.parse.urlencode(params)}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str, at: float | None = None) -> float | None:
        """The single value of a query that yields one series (None: no series)."""
        res = self.query(promql, at)
        if not res:
            return None
        assert len(res) == 1, res
        return float(res[0]["value"][1])

    def scraped_after(self, t: float, timeout_s: float = 60.0) -> float:
        """Wait until every target was scraped after unix time ``t``; returns the time of
        the newest scrape."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            res = self.query("min(timestamp(up))")
            if res and float(res[0]["value"][1]) > t:
                return float(res[0]["value"][1])
            time.sleep(0.25)
        raise AssertionError(f"no scrape after {t} in {timeout_s} s: {self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
