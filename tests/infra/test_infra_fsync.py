"""The fsync policy: every shipped config fsyncs before acknowledging, and ``NatsServer(sync=...)``
puts the chosen policy in force. Checked in the server's own report (``/varz``), not in the files."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infra import provision
from services.common.natsserver import NatsServer, config_with_sync, nats_server_binary
from tests.support import free_port

NATS_DIR = Path(provision.__file__).parent / "nats"


def jetstream_config(monitor_url: str, timeout: float = 15.0) -> dict:
    """The ``jetstream.config`` object of the server's ``/varz`` (retried until the port answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{monitor_url}/varz", timeout=2) as resp:
                return json.load(resp)["jetstream"]["config"]
        except (OSError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_config_with_sync_sets_the_one_sync_line():
    text = (NATS_DIR / "server.conf").read_text()

    interval = config_with_sync(text, "interval")

    assert re.findall(r"^\s*sync_interval:.*$", interval, re.M) == ['  sync_interval: "2m"']
    assert interval.replace('sync_interval: "2m"', "sync_interval: always") == text
    assert "sync_interval: always" in config_with_sync(None, "always")
    with pytest.raises(ValueError, match="unknown fsync policy"):
        config_with_sync(text, "sometimes")
    with pytest.raises(ValueError, match="0 sync_interval lines"):
        config_with_sync("listen: 127.0.0.1:4222\n", "always")


@pytest.mark.parametrize(("sync", "always"), [(None, True), ("always", True), ("interval", False)])
def test_single_node_server_reports_the_policy_in_force(tmp_path: Path, sync: str | None, always: bool):
    server = NatsServer(tmp_path / "nats", config=NATS_DIR / "server.conf", log_file=tmp_path / "nats.log",
                        sync=sync, monitor_port=-1).start()
    try:
        config = jetstream_config(server.monitor_url)
        with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=2) as resp:
            varz = json.load(resp)
    finally:
        server.stop()

    assert config.get("sync_always", False) is always
    if not always:
        assert config["sync_interval"] == 120 * 10**9  # nanoseconds: the two-minute default
    # The rest of server.conf is still in force (the copy changes only the sync line).
    assert varz["server_name"] == "cy-nats" and varz["max_payload"] == 8 * 1024 * 1024
    assert config["max_memory"] == 1024**3


@pytest.mark.parametrize("node", ["n1", "n2", "n3"])
def test_cluster_nodes_fsync_before_acknowledging(tmp_path: Path, node: str):
    text = (NATS_DIR / "cluster" / f"{node}.conf").read_text()
    monitor = free_port()
    # This node alone, on free ports (it waits for its routes, but serves /varz meanwhile).
    # Each line by its own anchor: an unanchored pattern would also match a picked client port
    # that happens to start with the route ports' digits, giving both listeners one port.
    text = re.sub(r"^listen: 127\.0\.0\.1:\d+", f"listen: 127.0.0.1:{free_port()}", text, flags=re.M)
    text = re.sub(r"^http: 127\.0\.0\.1:\d+", f"http: 127.0.0.1:{monitor}", text, flags=re.M)
    text = re.sub(r"^(\s+)listen: 127\.0\.0\.1:\d+", rf"\g<1>listen: 127.0.0.1:{free_port()}", text, flags=re.M)
    text = re.sub(r'store_dir: ".*"', f'store_dir: "{tmp_path / node}"', text)
    conf = tmp_path / f"{node}.conf"
    conf.write_text(text)
    with (tmp_path / f"{node}.log").open("wb") as log:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        config = jetstream_config(f"http://127.0.0.1:{monitor}")
    finally:
        proc.terminate()
        proc.wait(10)

    assert config.get("sync_always") is True
