"""Constrained decoding (structured outputs) with llguidance, shared by the engines that sample themselves.

``compiler.GrammarCompiler`` turns a request's ``StructuredOutput`` into an llguidance grammar
(cached per constraint, bounded in memory, under a time limit, its cost observed as
``llm_engine_grammar_compile_seconds``); ``constraint.RowConstraint`` is one sequence's matcher
and token mask, applied to that row's logits at every step. Why llguidance:
``docs/benchmarks.md`` ("Grammar libraries").
"""
