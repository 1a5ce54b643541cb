"""Wire protocol v1, sans-I/O: framing codecs and client/gateway messages.

Nothing here imports asyncio or sockets; codecs are fed bytes and give events.
"""
