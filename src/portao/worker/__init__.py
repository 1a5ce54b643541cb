"""Workers: the app a user writes, the ctx its handlers get, the runner that feeds them."""

from portao.worker.app import App, load_app
from portao.worker.context import ConnAddr, Context
from portao.worker.runner import Worker, WorkerStats

__all__ = ["App", "ConnAddr", "Context", "Worker", "WorkerStats", "load_app"]
