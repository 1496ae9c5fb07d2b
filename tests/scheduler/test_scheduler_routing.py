"""What the scheduler does with one message, and its strict config: pure, no NATS."""

from __future__ import annotations

import time

import pytest

from schemas.errors import ErrorCode
from schemas.events import encode
from schemas.inference import DispatchReply, InferenceRequest
from services.scheduler.config import parse_args
from services.scheduler.triage import (Cancelled, Dispatchable, Duplicate, Expired, InFlight, Malformed, classify,
                                        refusal_is_final, retry_delay, valid_subject)


def verdict(data: bytes, *, cancelled=(), accepted=(), dispatching=(), now: float | None = None):
    return classify(data, now=time.time() if now is None else now, cancelled=set(cancelled),
                    accepted=set(accepted), dispatching=set(dispatching))


def req(**kw) -> bytes:
    fields = dict(id="r1", model="m", reply_to="_INBOX.edge.r1", prompt="hi")
    fields.update(kw)
    return encode(InferenceRequest(**fields))


def test_a_valid_request_is_dispatchable():
    v = verdict(req())
    assert isinstance(v, Dispatchable) and v.request.model == "m"


def test_deadline_in_the_past_is_expired_and_zero_means_none():
    assert isinstance(verdict(req(deadline=time.time() - 1)), Expired)
    assert isinstance(verdict(req(deadline=time.time() + 60)), Dispatchable)
    assert isinstance(verdict(req(deadline=0.0), now=1e12), Dispatchable)


def test_remembered_ids_win_in_order_accepted_inflight_cancelled():
    assert isinstance(verdict(req(), accepted={"r1"}, cancelled={"r1"}), Duplicate)
    assert isinstance(verdict(req(), dispatching={"r1"}), InFlight)
    assert isinstance(verdict(req(deadline=1.0), cancelled={"r1"}), Cancelled)


def test_malformed_messages_keep_a_readable_reply_to():
    v = verdict(b'{"id": "r9", "reply_to": "_INBOX.x.r9", "model": 5}')
    assert isinstance(v, Malformed) and v.reply_to == "_INBOX.x.r9" and v.request_id == "r9"
    assert "InferenceRequest" in v.reason
    v = verdict(b"not json")
    assert isinstance(v, Malformed) and v.reply_to is None
    assert isinstance(verdict(req(id="")), Malformed)
    v = verdict(req(reply_to="_INBOX.>"))
    assert isinstance(v, Malformed) and v.reply_to is None


def test_retry_delay_doubles_per_delivery_up_to_the_cap():
    assert [retry_delay(n, 0.25, 2.0) for n in (0, 1, 2, 3, 4, 5, 100)] == [0.25, 0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_subject_validation():
    assert valid_subject("_INBOX.edge.abc-1")
    for bad in ("", "a..b", "a.*", "a.>", "has space", ".a", "a."):
        assert not valid_subject(bad)


def test_request_level_refusals_are_final_engine_level_ones_are_not():
    refuse = lambda code: DispatchReply(accepted=False, worker="w", code=code)  # noqa: E731
    assert refusal_is_final(refuse(ErrorCode.CONTEXT_LENGTH_EXCEEDED))
    assert refusal_is_final(refuse(ErrorCode.INVALID_REQUEST))
    assert not refusal_is_final(refuse(ErrorCode.ENGINE_BUSY))
    assert not refusal_is_final(refuse(ErrorCode.MODEL_NOT_FOUND))
    assert not refusal_is_final(refuse(ErrorCode.UNSUPPORTED))  # another engine may support it
    assert not refusal_is_final(refuse(None))
    assert not refusal_is_final(DispatchReply(accepted=True, worker="w"))


def test_config_is_strict(tmp_path, capsys):
    cfg = parse_args(["--nats-url", "nats://h:1", "--max-attempts", "5"])
    assert (cfg.nats_url, cfg.max_attempts, cfg.metrics_port) == ("nats://h:1", 5, 0)
    good = tmp_path / "ok.toml"
    good.write_text("fetch_wait = 0.01\nmax_attempts = 2\n")
    cfg = parse_args(["--config", str(good), "--max-attempts", "4"])
    assert (cfg.fetch_wait, cfg.max_attempts) == (0.01, 4)
    bad = tmp_path / "bad.toml"
    bad.write_text("fetch_wiat = 0.01\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert "fetch_wiat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dispatch-timeout", "0"])
