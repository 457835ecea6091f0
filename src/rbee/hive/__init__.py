"""The hive: one per machine. Spawns and stops workers, keeps (and downloads) models, heartbeats to the queen."""

from rbee.hive.app import HiveSettings, HiveState, create_hive_app
from rbee.hive.catalog import ModelCatalog, ModelEntry
from rbee.hive.download import Downloader
from rbee.hive.embedded import EmbeddedHive
from rbee.hive.gguf import GGUFError, GGUFInfo, read_gguf
from rbee.hive.heartbeat import HeartbeatLoop, HttpDelivery
from rbee.hive.supervisor import Supervisor, WorkerProcess

__all__ = [
    "Downloader",
    "EmbeddedHive",
    "GGUFError",
    "GGUFInfo",
    "HeartbeatLoop",
    "HiveSettings",
    "HiveState",
    "HttpDelivery",
    "ModelCatalog",
    "ModelEntry",
    "Supervisor",
    "WorkerProcess",
    "create_hive_app",
    "read_gguf",
]
