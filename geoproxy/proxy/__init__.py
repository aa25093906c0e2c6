"""The proxy stage: moving the bytes. The fast lane and the coroutine path, the header
rules, the lean upstream client, the relay, WebSockets, and the aiohttp window (``compat``).
"""
