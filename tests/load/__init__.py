"""Helpers of the load tests (tests/integration/test_load.py): many cheap client connections
without an asyncio transport each, and the server's memory."""
