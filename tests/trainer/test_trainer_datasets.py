"""Trainer datasets: every format read to the same conversations, errors a user can act on,
paths confined to the allowed directories, and loss labels on the assistant replies only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.trainer.dataset_records import ASSISTANT, COMPLETION, TEXT, USER
from services.trainer.datasets import (
    IGNORE_INDEX,
    Conversation,
    DatasetError,
    Turn,
    load_dataset,
    prepare,
    resolve_path,
    tokenize,
)

# The same three examples in every format: (instruction, input, output) in alpaca terms.
ROWS = [("Translate to French", "cheese", "fromage"), ("Name a primary colour.", "", "Red."),
        ("What is 2+2?", "", "4")]
EXPECTED = [Conversation((Turn(USER, f"{i}\n\n{x}" if x else i), Turn(ASSISTANT, o))) for i, x, o in ROWS]


def alpaca_records() -> list[dict]:
    return [{"instruction": i, "input": x, "output": o} for i, x, o in ROWS]


def openai_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": c.turns[0].text},
                          {"role": "assistant", "content": c.turns[1].text}]} for c in EXPECTED]


def sharegpt_records() -> list[dict]:
    return [{"conversations": [{"from": "human", "value": c.turns[0].text},
                               {"from": "gpt", "value": c.turns[1].text}]} for c in EXPECTED]


def lines(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def write_hf(path: Path, records: list[dict], split: str | None = None) -> None:
    import datasets

    dataset = datasets.Dataset.from_list(records)
    (datasets.DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(path))


def write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


WRITERS = {
    "data.json": (lambda p: p.write_text(json.dumps({"data": alpaca_records()})), "json", "alpaca"),
    "alpaca.json": (lambda p: p.write_text(json.dumps(alpaca_records(), indent=2)), "json", "alpaca"),
    "alpaca.jsonl": (lambda p: p.write_text(lines(alpaca_records())), "jsonl", "alpaca"),
    "sharegpt.json": (lambda p: p.write_text(json.dumps(sharegpt_records())), "json", "sharegpt"),
    "sharegpt.jsonl": (lambda p: p.write_text(lines(sharegpt_records())), "jsonl", "sharegpt"),
    "openai.jsonl": (lambda p: p.write_text(lines(openai_records())), "jsonl", "openai"),
    "openai-lines.json": (lambda p: p.write_text(lines(openai_records())), "jsonl", "openai"),
    "saved_openai": (lambda p: write_hf(p, openai_records()), "hf_disk", "openai"),
    "saved_dict_alpaca": (lambda p: write_hf(p, alpaca_records(), split="train"), "hf_disk", "alpaca"),
    "alpaca.csv": (lambda p: write_csv(p, alpaca_records()), "csv", "alpaca"),
    "messages.csv": (lambda p: write_csv(p, [{"messages": json.dumps(r["messages"])} for r in openai_records()]),
                     "csv", "openai"),
    "openai.parquet": (lambda p: write_parquet(p, openai_records()), "parquet", "openai"),
    "alpaca.parquet": (lambda p: write_parquet(p, alpaca_records()), "parquet", "alpaca"),
    "sharegpt.parquet": (lambda p: write_parquet(p, sharegpt_records()), "parquet", "sharegpt"),
}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    """The default model's tokenizer (SmolLM2: ChatML template without {% generation %})."""
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_is_detected_and_loads_the_same_conversations(tmp_path: Path, name: str) -> None:
    write, container, shape = WRITERS[name]
    write(tmp_path / name)
    loaded = load_dataset(tmp_path / name)
    assert (loaded.container, loaded.shape) == (container, shape)
    assert loaded.conversations == EXPECTED
    assert loaded.info().records == 3


def test_prompt_completion_and_text_records_keep_their_kind(tmp_path: Path) -> None:
    (tmp_path / "pc.jsonl").write_text(lines([{"prompt": "The capital of France is", "completion": " Paris."}]))
    write_csv(tmp_path / "t.csv", [{"text": "Once upon a time."}, {"text": "The end."}])
    pc = load_dataset(tmp_path / "pc.jsonl")
    assert (pc.shape, pc.conversations[0].kind) == ("openai", COMPLETION)
    assert [t.text for t in pc.conversations[0].turns] == ["The capital of France is", " Paris."]
    text = load_dataset(tmp_path / "t.csv")
    assert (text.container, text.shape) == ("csv", "text")
    assert [c.kind for c in text.conversations] == [TEXT, TEXT]


def test_sharegpt_system_turn_and_openai_weight(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]}
    (tmp_path / "s.json").write_text(json.dumps([record]))
    assert [t.role for t in load_dataset(tmp_path / "s.json").conversations[0].turns] == \
        ["system", "user", "assistant"]
    weighted = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    (tmp_path / "w.jsonl").write_text(lines([weighted]))
    turns = load_dataset(tmp_path / "w.jsonl").conversations[0].turns
    assert [t.trained for t in turns if t.role == "assistant"] == [False, True]


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(lines(alpaca_records()))
    forced_shape = load_dataset(tmp_path / "a.jsonl", "alpaca")
    assert (forced_shape.container, forced_shape.shape) == ("jsonl", "alpaca")
    (tmp_path / "chats.txt").write_text(lines(openai_records()))
    forced_container = load_dataset(tmp_path / "chats.txt", "jsonl")
    assert (forced_container.container, forced_container.shape) == ("jsonl", "openai")
    assert forced_container.conversations == EXPECTED
    with pytest.raises(DatasetError) as err:  # openai records read as alpaca: the alpaca field is missing
        load_dataset(tmp_path / "chats.txt", "alpaca", filename_hint="chats.jsonl")
    assert (err.value.code, err.value.line, err.value.field) == ("missing_field", 1, "instruction")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "a.jsonl", "yaml")
    assert err.value.code == "invalid_file_format" and "auto" in str(err.value)


@pytest.mark.parametrize("hint,container", [("train.csv", "csv"), ("train.jsonl", "jsonl"), ("t.JSON", "json")])
def test_filename_hint_gives_extension_less_uploads_their_format(tmp_path: Path, hint: str, container: str) -> None:
    upload = tmp_path / "file-0123abcd"
    if container == "csv":
        write_csv(upload, alpaca_records())
    else:
        upload.write_text(lines(alpaca_records()) if container == "jsonl" else json.dumps(alpaca_records()))
    loaded = load_dataset(upload, filename_hint=hint)
    assert (loaded.file, loaded.container, loaded.conversations) == (hint, container, EXPECTED)


@pytest.mark.parametrize("name,container", [("openai.jsonl", "jsonl"), ("sharegpt.json", "json"),
                                            ("alpaca.csv", "csv"), ("openai.parquet", "parquet")])
def test_extension_less_file_without_hint_is_sniffed(tmp_path: Path, name: str, container: str) -> None:
    write = WRITERS[name][0]
    write(tmp_path / name)
    upload = tmp_path / "file-xyz"
    (tmp_path / name).rename(upload)
    loaded = load_dataset(upload)
    assert (loaded.container, loaded.conversations) == (container, EXPECTED)


@pytest.mark.parametrize("name,fmt,code", [("openai.jsonl", "json", "invalid_json"),
                                            ("openai.jsonl", "parquet", "invalid_file_format"),
                                            ("openai.parquet", "csv", "invalid_file_format"),
                                            ("openai.jsonl", "hf_disk", "invalid_file_format")])
def test_forced_container_that_does_not_fit_is_a_clear_error(tmp_path: Path, name: str, fmt: str, code: str) -> None:
    WRITERS[name][0](tmp_path / name)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / name, fmt)
    assert err.value.code == code and str(err.value).startswith(name)


def test_unrecognisable_upload_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file-1").write_text("just some words\nno structure\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "file-1", filename_hint="notes")
    assert err.value.code == "invalid_file_format" and str(err.value).startswith("notes: ")


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = chat(("user", "hi"), ("assistant", "hello"))
# name, file content, error code, line, unit, field, fragment of the message
BAD = [
    ("train.jsonl", lines([GOOD, GOOD, {"msgs": []}]), "missing_field", 3, "line", "messages",
     'expected OpenAI chat records: {"messages": [{"role": ..., "content": ...}]}'),
    ("train.jsonl", lines([GOOD]) + '{"messages": [\n', "invalid_json", 2, "line", None, "invalid JSON"),
    ("train.jsonl", lines([GOOD]) + "\n" + lines([chat(("user", "x"), ("robot", "y"))]), "unknown_role", 3,
     "line", "messages[1].role", '"robot"'),
    ("train.jsonl", lines([chat(("user", "x"))]), "no_assistant_turn", 1, "line", "messages", "no assistant turn"),
    ("train.jsonl", lines([GOOD, chat(("user", "x"), ("assistant", 42))]), "invalid_field_type", 2, "line",
     "messages[1].content", "must be a string, got number"),
    ("train.jsonl", lines([{"foo": 1}]), "missing_field", 1, "line", None, 'found: "foo"'),
    ("sg.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]),
     "unknown_role", 1, "record", "conversations[1].from", '"bot"'),
    ("al.json", json.dumps(alpaca_records() + [{"instruction": "x"}]), "missing_field", 4, "record", "output",
     "alpaca records"),
    ("al.json", json.dumps([alpaca_records()[0], "text"]), "invalid_file_format", 2, "record", None,
     "got string"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": }\n]', "invalid_json", 3, "line", None, "invalid JSON"),
    ("msg.csv", 'messages\n"[{""role"": ""user"", ""content"": ""x""}"\n', "invalid_json", 1, "record",
     "messages", "not valid JSON"),
    ("al.csv", "instruction,output\nfirst,one\nsecond\n", "missing_field", 2, "record", "output", "alpaca"),
]


@pytest.mark.parametrize("name,content,code,line,unit,field,fragment", BAD,
                         ids=[f"{b[2]}-{b[0]}-{b[3]}" for b in BAD])
def test_bad_dataset_errors_name_file_line_and_field(tmp_path: Path, name: str, content: str, code: str,
                                                     line: int, unit: str, field: str | None,
                                                     fragment: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / name)
    e = err.value
    assert (e.code, e.file, e.line, e.unit, e.field) == (code, name, line, unit, field)
    assert str(e).startswith(f"{name} {unit} {line}: ")
    assert fragment in str(e)
    if field:
        assert f'"{field}"' in str(e)


def test_missing_field_message_is_the_documented_sentence(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(lines([GOOD, GOOD, {"prompt_only": "x"}]))
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "train.jsonl", "openai")
    assert str(err.value) == ('train.jsonl line 3: field "messages" is missing (expected OpenAI chat records: '
                              '{"messages": [{"role": ..., "content": ...}]})')


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("blank.jsonl", "\n \n"), ("e.json", "[]"),
                                          ("e.csv", "instruction,input,output\n"), ("file-0", "")])
def test_empty_datasets_are_refused(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / name)
    assert err.value.code == "empty_file" and str(err.value).startswith(f"{name}: ")


def test_missing_file_and_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "nope.jsonl")
    assert err.value.code == "file_not_found"
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "folder")
    assert err.value.code == "invalid_file_format" and "save_to_disk" in str(err.value)


@pytest.fixture
def data_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed directory with one dataset, and a directory beside it that is not allowed."""
    allowed, secret = tmp_path / "data", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    (allowed / "train.jsonl").write_text(lines(openai_records()))
    (secret / "keys.jsonl").write_text("{}\n")
    return allowed, secret


def test_resolve_path_accepts_files_inside_allowed_dirs(data_dirs: tuple[Path, Path]) -> None:
    allowed, _ = data_dirs
    target = (allowed / "train.jsonl").resolve()
    assert resolve_path(str(allowed / "train.jsonl"), [allowed]) == target
    assert resolve_path("train.jsonl", [allowed]) == target
    assert resolve_path(str(allowed / "sub" / ".." / "train.jsonl"), [allowed]) == target
    (allowed / "link.jsonl").symlink_to(allowed / "train.jsonl")
    assert resolve_path(str(allowed / "link.jsonl"), [allowed]) == target


@pytest.mark.parametrize("how", ["absolute", "dotdot", "relative_dotdot", "symlink", "sibling_prefix", "no_dirs"])
def test_resolve_path_refuses_paths_outside_allowed_dirs(data_dirs: tuple[Path, Path], how: str) -> None:
    allowed, secret = data_dirs
    dirs = [allowed]
    if how == "absolute":
        path = str(secret / "keys.jsonl")
    elif how == "dotdot":
        path = str(allowed / ".." / "secret" / "keys.jsonl")
    elif how == "relative_dotdot":
        path = "../secret/keys.jsonl"
    elif how == "symlink":
        (allowed / "innocent.jsonl").symlink_to(secret / "keys.jsonl")
        path = str(allowed / "innocent.jsonl")
    elif how == "sibling_prefix":  # /x/data2 is not inside /x/data
        (allowed.parent / "data2").mkdir()
        (allowed.parent / "data2" / "t.jsonl").write_text("{}\n")
        path = str(allowed.parent / "data2" / "t.jsonl")
    else:
        path, dirs = str(allowed / "train.jsonl"), []
    with pytest.raises(DatasetError) as err:
        resolve_path(path, dirs)
    assert err.value.code == "path_not_allowed"
    assert str(err.value).startswith(f"{path}: ")
    assert ("outside the directories" if dirs else "reads no dataset paths") in str(err.value)


def test_resolve_path_missing_file_inside_allowed_dir(data_dirs: tuple[Path, Path]) -> None:
    allowed, _ = data_dirs
    with pytest.raises(DatasetError) as err:
        resolve_path(str(allowed / "absent.jsonl"), [allowed])
    assert err.value.code == "file_not_found"


def trained_runs(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive trained tokens of an example."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def test_chat_labels_cover_only_assistant_replies_and_end_of_turn(tokenizer) -> None:
    conv = Conversation((Turn("system", "Be brief."), Turn(USER, "2+2?"), Turn(ASSISTANT, "It is 4."),
                         Turn(USER, "And 3+3?"), Turn(ASSISTANT, "6, of course.")))
    tokenized = tokenize([conv], tokenizer, 512)
    example = tokenized[0]
    eot = tokenizer.eos_token  # SmolLM2's <|im_end|>
    assert trained_runs(tokenizer, example) == [f"It is 4.{eot}", f"6, of course.{eot}"]
    messages = [{"role": t.role, "content": t.text} for t in conv.turns]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenized.total_tokens == len(example.input_ids)
    assert tokenized.trained_tokens == sum(1 for label in example.labels if label != IGNORE_INDEX)


def test_every_loaded_format_tokenises_to_trained_replies(tmp_path: Path, tokenizer) -> None:
    WRITERS["openai.jsonl"][0](tmp_path / "openai.jsonl")
    tokenized, info = prepare(tmp_path / "openai.jsonl", tokenizer, 256)
    assert [trained_runs(tokenizer, ex) for ex in tokenized] == [[f"{o}{tokenizer.eos_token}"] for _, _, o in ROWS]
    assert (info.format, info.records, info.examples, info.dropped) == ("jsonl/openai", 3, 3, 0)
    assert info.total_tokens == sum(len(ex.input_ids) for ex in tokenized)
    assert info.as_dict()["trained_tokens"] == info.trained_tokens > 0


def test_reply_spans_survive_a_template_that_is_not_prefix_stable(default_model_dir: Path) -> None:
    odd = AutoTokenizer.from_pretrained(default_model_dir)
    # A trailer only at the very end: rendering up to a reply is no prefix of the whole conversation.
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% else %}<|endoftext|>{% endif %}")
    conv = Conversation((Turn(USER, "2+2?"), Turn(ASSISTANT, "It is 4."), Turn(USER, "3+3?"), Turn(ASSISTANT, "6.")))
    runs = trained_runs(odd, tokenize([conv], odd, 512)[0])
    assert runs[0] == f"It is 4.{odd.eos_token}" and runs[1].startswith(f"6.{odd.eos_token}")
    assert len(runs) == 2


def test_weight_zero_reply_is_not_trained(tokenizer) -> None:
    conv = Conversation((Turn(USER, "a"), Turn(ASSISTANT, "first", trained=False), Turn(USER, "b"),
                         Turn(ASSISTANT, "second")))
    assert trained_runs(tokenizer, tokenize([conv], tokenizer, 512)[0]) == [f"second{tokenizer.eos_token}"]


def test_completion_masks_the_prompt_and_trains_completion_with_eos(tokenizer) -> None:
    conv = Conversation((Turn(USER, "The capital of France is"), Turn(ASSISTANT, " Paris.")), kind=COMPLETION)
    example = tokenize([conv], tokenizer, 512)[0]
    assert trained_runs(tokenizer, example) == [f" Paris.{tokenizer.eos_token}"]
    assert tokenizer.decode(example.input_ids) == f"The capital of France is Paris.{tokenizer.eos_token}"


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer) -> None:
    example = tokenize([Conversation((Turn(ASSISTANT, "Once upon a time."),), kind=TEXT)], tokenizer, 512)[0]
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_cuts_examples_and_drops_those_left_without_a_reply(tokenizer) -> None:
    long_reply = Conversation((Turn(USER, "Count."), Turn(ASSISTANT, " ".join(str(n) for n in range(200)))))
    full = tokenize([long_reply], tokenizer, 4096)[0]
    cut = tokenize([long_reply], tokenizer, 64)
    assert (len(cut), cut.truncated, cut.dropped) == (1, 1, 0)
    assert cut[0].input_ids == full.input_ids[:64] and cut[0].labels == full.labels[:64]
    prompt_len = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    short_text = Conversation((Turn(ASSISTANT, "Hi."),), kind=TEXT)
    dropped = tokenize([long_reply, short_text], tokenizer, prompt_len)
    assert (len(dropped), dropped.dropped, dropped.truncated) == (1, 1, 1)
    assert dropped[0].labels == dropped[0].input_ids  # the text example survives whole


def test_prepare_refuses_a_dataset_truncated_to_nothing(tmp_path: Path, tokenizer) -> None:
    WRITERS["alpaca.jsonl"][0](tmp_path / "a.jsonl")
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path / "a.jsonl", tokenizer, 8)
    assert err.value.code == "no_trainable_examples" and "max_seq_length=8" in str(err.value)


def test_chat_records_need_a_chat_template(tmp_path: Path, default_model_dir: Path) -> None:
    bare = AutoTokenizer.from_pretrained(default_model_dir)
    bare.chat_template = None
    WRITERS["openai.jsonl"][0](tmp_path / "openai.jsonl")
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path / "openai.jsonl", bare, 256)
    assert err.value.code == "no_chat_template" and str(err.value).startswith("openai.jsonl line 1: ")
