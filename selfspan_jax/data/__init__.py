"""Span-annotated datasets and batching.

- `arithmetic`: step-by-step expression evaluation; generator + checker.
- `summarization`: CNN/DailyMail-style news with ROUGE-aligned references.
- `batches`: tokenisation, loss masks, span attention masks, resumable stream.

Submodules are imported explicitly (`from selfspan_jax.data import arithmetic`)
so that generating data does not import jax.
"""
