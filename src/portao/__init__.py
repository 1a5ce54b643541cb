"""portao: an asyncio connection gateway in front of a message broker.

Clients speak wire protocol v1 to a gateway; the gateway wraps their requests in
envelopes and hands them to a broker; workers run the application's handlers and
answer through the gateway that holds the client.
"""

__version__ = "0.1.0"
