"""``./cy batch``: against an in-process edge and its batch runner, the test answering the low lane."""

from __future__ import annotations

import asyncio
import json

from services.cli.main import main
from tests.batch_harness import chat_line, jsonl
from tests.edge.test_edge_batch import edge, low  # noqa: F401 - fixtures
from tests.edge_harness import engine  # noqa: F401 - fixtures


def _cy(*argv: str):
    """Run ``cy`` in a thread (it runs its own event loop), as a separate process would."""
    return asyncio.to_thread(main, list(argv))


async def test_submit_follow_shows_progress_then_download_status_and_list(edge, low, tmp_path, capsys):
    data = tmp_path / "requests.jsonl"
    data.write_bytes(jsonl([chat_line(f"r{i}") for i in range(6)] + [chat_line("bad", max_tokens=0)]).getvalue())
    url = str(edge.make_url(""))
    assert await _cy("batch", "submit", str(data), "--metadata", "team=a", "--follow", "--url", url) == 0
    out = capsys.readouterr().out
    batch_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    assert "7 requests to /v1/chat/completions" in out
    assert "7/7  100.0%  failed 1  completed" in out
    assert f"{batch_id} completed: output_file_id file-" in out

    assert await _cy("batch", "download", batch_id, "--dir", str(tmp_path), "--url", url) == 0
    output = [json.loads(line) for line in (tmp_path / f"{batch_id}_output.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / f"{batch_id}_errors.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in output) == [f"r{i}" for i in range(6)]
    assert [r["custom_id"] for r in errors] == ["bad"]

    assert await _cy("batch", "status", batch_id, "--url", url) == 0
    assert await _cy("batch", "list", "--url", url) == 0
    shown = capsys.readouterr().out
    assert "requests:  7 (6 completed, 1 failed)" in shown
    assert f"{batch_id}  completed  7/7" in shown


async def test_follow_exits_3_when_the_batch_is_cancelled(edge, low, tmp_path, capsys):
    low.hold = True
    data = tmp_path / "requests.jsonl"
    data.write_bytes(jsonl([chat_line(f"h{i}") for i in range(3)]).getvalue())
    url = str(edge.make_url(""))
    assert await _cy("batch", "submit", str(data), "--url", url) == 0
    batch_id = capsys.readouterr().out.split("submitted ", 1)[1].split(":", 1)[0]
    following = asyncio.create_task(_cy("batch", "follow", batch_id, "--url", url))
    await low.wait_taken(3)
    assert await _cy("batch", "cancel", batch_id, "--url", url) == 0
    assert await asyncio.wait_for(following, 60) == 3
    out = capsys.readouterr().out
    assert f"{batch_id}: cancelling" in out and f"{batch_id} cancelled: error_file_id file-" in out
    assert await _cy("batch", "download", batch_id, "--dir", str(tmp_path), "--url", url) == 0
    assert not (tmp_path / f"{batch_id}_output.jsonl").exists()
    assert len((tmp_path / f"{batch_id}_errors.jsonl").read_text().splitlines()) == 3
