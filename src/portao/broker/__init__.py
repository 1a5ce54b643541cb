"""Brokers: the only code that imports redis or aiormq.

`base` holds the protocols every backend implements; `create_broker` picks one by
URL scheme.
"""

from portao.broker.base import Broker, DeadLetter, Delivery, Member, StateStore
from portao.broker.factory import create_broker, create_state

__all__ = [
    "Broker",
    "DeadLetter",
    "Delivery",
    "Member",
    "StateStore",
    "create_broker",
    "create_state",
]
