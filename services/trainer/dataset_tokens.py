"""Normalised conversations to token ids and loss labels for causal-LM fine-tuning.

Chat conversations go through the model's own chat template; the loss is on the assistant
replies only, each with the end-of-turn token the template puts after it. The reply spans are
found by rendering the conversation up to each reply (with and without the reply) and taking
the character difference, so no ``{% generation %}`` support is needed in the template;
tokens are then labelled from the tokenizer's character offsets of the full rendering.
CPU-bound: callers on an event loop run it in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from jinja2 import TemplateError

from services.trainer.dataset_records import ASSISTANT, COMPLETION, TEXT, Conversation, DatasetError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers) skips


@dataclass
class Example:
    """One tokenised example; ``labels[i]`` is ``input_ids[i]`` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedDataset:
    """Tokenised examples, iterable like a list, with the counts a job reports.

    ``dropped``: examples with nothing left to train on after truncation; ``truncated``: examples
    cut to ``max_seq_length``; ``total_tokens``/``trained_tokens``: all tokens and labelled tokens
    of the kept examples (one epoch).
    """

    examples: list[Example] = field(default_factory=list)
    dropped: int = 0
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def tokenize(conversations: Iterable[Conversation], tokenizer, max_seq_length: int) -> TokenizedDataset:
    """Tokenise ``conversations`` with ``tokenizer`` (a transformers tokenizer), truncating each to
    ``max_seq_length`` tokens and dropping those left with no trained token."""
    out = TokenizedDataset()
    for conv in conversations:
        ids, labels = encode(conv, tokenizer)
        if len(ids) > max_seq_length:
            out.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        if not trained:
            out.dropped += 1
            continue
        out.examples.append(Example(ids, labels))
        out.total_tokens += len(ids)
        out.trained_tokens += trained
    return out


def encode(conv: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation, untruncated."""
    if conv.kind == TEXT:
        ids = _with_eos(_ids(tokenizer(conv.turns[0].text, add_special_tokens=True)), tokenizer)
        return ids, list(ids)
    if conv.kind == COMPLETION:
        prompt, completion = conv.turns[0].text, conv.turns[1].text
        text = prompt + completion
        ids, labels = _encode_spans(tokenizer, text, [(len(prompt), len(text))], special=True)
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids, labels = ids + [eos], labels + [eos]
        return ids, labels
    return _encode_chat(conv, tokenizer)


def _ids(encoding) -> list[int]:
    return list(encoding["input_ids"])


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _fail(conv: Conversation, code: str, message: str) -> DatasetError:
    file, line, unit = conv.source or (None, None, "line")
    return DatasetError(code, message, file=file, line=line, unit=unit)


def _render(tokenizer, messages: list[dict], conv: Conversation, *, generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except (TemplateError, ValueError) as exc:  # templates raise_exception() on e.g. non-alternating roles
        raise _fail(conv, "template_error", f"the model's chat template rejects this conversation: {exc}") from None


def _encode_chat(conv: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise _fail(conv, "no_chat_template", "the model's tokenizer has no chat template, so chat records "
                    'cannot be rendered; use {"prompt", "completion"} or {"text"} records instead')
    messages = [{"role": t.role, "content": t.text} for t in conv.turns]
    full = _render(tokenizer, messages, conv)
    spans, cursor = [], 0
    for i, turn in enumerate(conv.turns):
        if turn.role == ASSISTANT and turn.trained:
            start, end = _reply_span(tokenizer, messages, i, full, cursor, conv)
            spans.append((start, end))
            cursor = end
    return _encode_spans(tokenizer, full, spans, special=False)


def _reply_span(tokenizer, messages: list[dict], i: int, full: str, cursor: int,
                conv: Conversation) -> tuple[int, int]:
    """Character span of reply ``i`` in ``full``: its text and end-of-turn marker, not the header."""
    after = _render(tokenizer, messages[: i + 1], conv)
    before = _render(tokenizer, messages[:i], conv, generation=True) if i else None
    if before is not None and after.startswith(before) and full.startswith(after) and len(before) >= cursor:
        start, end = len(before), len(after)
    else:  # the template is not prefix-stable (it rewrites earlier turns): find the reply's text
        content = messages[i]["content"]
        start = full.find(content, cursor)
        if start < 0:
            raise _fail(conv, "template_error", f"assistant turn {i} is not in the chat template's output")
        end = start + len(content)
        eos = tokenizer.eos_token
        if eos and full.startswith(eos, end):
            end += len(eos)
    while end > start and full[end - 1].isspace():  # the newline after <|im_end|> is the template's
        end -= 1
    return start, end


def _encode_spans(tokenizer, text: str, spans: list[tuple[int, int]], *,
                  special: bool) -> tuple[list[int], list[int]]:
    """Tokenise ``text`` once; label the tokens that overlap a trained character span."""
    if not getattr(tokenizer, "is_fast", False):
        return _encode_pieces(tokenizer, text, spans, special=special)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = _ids(enc)
    labels = [tid if any(a < end and start < b for start, end in spans) else IGNORE_INDEX
              for tid, (a, b) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


def _encode_pieces(tokenizer, text: str, spans: list[tuple[int, int]], *,
                   special: bool) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenise trained and untrained pieces separately."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = _ids(tokenizer(text[a:b], add_special_tokens=special and a == 0))
        trained = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels
