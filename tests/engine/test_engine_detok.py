"""Incremental detokenization and stop strings, on the real tokenizer where it matters."""

from services.engine.text.detok import IncrementalDetokenizer, StopMatcher


def test_stop_string_split_across_deltas_is_never_emitted():
    m = StopMatcher(["STOP"])
    out = m.feed("hello S") + m.feed("TO") + m.feed("P and more")
    assert out == "hello "
    assert m.stopped and m.text == "hello "


def test_text_that_only_looked_like_a_stop_prefix_is_released():
    m = StopMatcher(["STOP"])
    assert m.feed("a ST") == "a "
    assert m.feed("ART") == "START"
    assert not m.stopped


def test_flush_releases_held_back_text():
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == "line"
    assert m.flush() == "\n"


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.feed("") == "" and m.flush() == ""


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"


def test_detokenizer_roundtrips_multibyte_text(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Grüße, 世界! 🚀 done"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(lambda x: tok.decode(x, skip_special_tokens=True))
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
