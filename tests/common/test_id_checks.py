"""Id and name checks refuse a value with a trailing newline (Python's ``$`` would let it through).

A subject token, reply subject, adapter id or API key that ends in ``\\n`` is not what it looks
like: published, it breaks the NATS protocol line; as a KV key, the read fails. Each check must
say no, so the caller gets its typed ``invalid_request``/``not_found`` instead of a crash.
"""

from __future__ import annotations

import pytest

from schemas import names
from schemas.errors import BusError, ErrorCode
from services.common.api_keys import key_id_of, new_api_key
from services.common.model_ref import check_adapter_id
from services.scheduler.triage import valid_subject


def test_each_check_accepts_the_value_and_refuses_it_with_a_trailing_newline():
    assert names.token("job-1") == "job-1"
    with pytest.raises(ValueError):
        names.token("job-1\n")
    assert valid_subject("_INBOX.abc") and not valid_subject("_INBOX.abc\n")
    key_id, key = new_api_key()
    assert key_id_of(key) == key_id and key_id_of(key + "\n") is None
    assert check_adapter_id("my-adapter.v1") == "my-adapter.v1"
    with pytest.raises(BusError) as info:
        check_adapter_id("my-adapter\n")
    assert info.value.code == ErrorCode.INVALID_REQUEST
