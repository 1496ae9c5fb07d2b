"""``./cy up --fsync``: the nats-server it starts reports, in its own ``/varz``, the policy asked for
(``always`` by default: acknowledged means fsynced)."""

from __future__ import annotations

import re

import pytest

from tests.infra.test_infra_fsync import jetstream_config
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.parametrize(("flags", "always"), [((), True), (("--fsync", "interval"), False)],
                         ids=["default", "interval"])
def test_cy_up_starts_nats_with_the_fsync_policy(tmp_path, default_model_dir, flags, always):
    with CyUp(state_dir_with_models(tmp_path, default_model_dir), "--no-trainer", *flags) as up:
        line = re.search(r"nats-server listening on .*fsync (\w+), monitoring (http://[\d.:]+)\)", up.output())
        assert line, up.output()
        config = jetstream_config(line.group(2))

    assert line.group(1) == ("always" if always else "interval")
    assert config.get("sync_always", False) is always
    if not always:
        assert config["sync_interval"] == 120 * 10**9
