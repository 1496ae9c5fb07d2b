"""The default model's weights in the object store: published once by provisioning, fetched by a host that has none."""

from __future__ import annotations

import filecmp

from schemas import names
from services.common import published_weights
from services.common.model_store import default_model_gguf, gguf_copy


async def test_a_host_with_an_empty_state_dir_gets_the_published_gguf_and_nothing_before_it_is_published(js, tmp_path):
    store = await js.object_store(names.ARTIFACTS_STORE)
    state = tmp_path / "engine-state"
    assert await published_weights.fetch_default(store, "llamacpp", state) is None
    assert not gguf_copy(state).exists() and not gguf_copy(state).with_name(gguf_copy(state).name + ".partial").exists()

    assert "published" in await published_weights.publish_default(store)
    assert "already published" in await published_weights.publish_default(store)  # same bytes: not sent again
    path = await published_weights.fetch_default(store, "llamacpp", state)
    assert path == gguf_copy(state)
    assert filecmp.cmp(path, default_model_gguf(), shallow=False)
