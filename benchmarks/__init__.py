"""Benchmarks for pymta: an asyncio SMTP load generator, a fast SMTP sink and scenarios.

Kept outside the ``pymta`` package on purpose: nothing here ships in the wheel, and the load
generator talks to the server only over sockets, as any client would, so a benchmark cannot
accidentally measure an in-process shortcut. Run with ``python -m benchmarks``; see README.md.
"""
