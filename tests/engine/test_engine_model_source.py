"""An engine started without ``--model-path`` takes its model from the registry, or says why it cannot."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


async def test_an_engine_without_a_model_path_names_a_model_the_registry_lacks(nats_server, nc, tmp_path):
    run = subprocess.run([sys.executable, "-m", "services.engine", "--nats-url", nats_server.url, "--engine",
                          "transformers", "--model-id", "no-such-model", "--worker-id", "w-missing",
                          "--state-dir", str(tmp_path / "state")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--model-id 'no-such-model' is not in the model registry and no --model-path was given" in run.stderr
    assert not (tmp_path / "state" / "models").exists()
