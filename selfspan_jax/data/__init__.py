"""Span-annotated datasets: `arithmetic` and `summarization`, and batching."""
