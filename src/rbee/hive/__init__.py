"""The hive: one per machine. Spawns and stops workers, keeps (and downloads) models, heartbeats to the queen.

Import what you use from its modules (:mod:`rbee.hive.app`, :mod:`rbee.hive.catalog`,
:mod:`rbee.hive.supervisor` ...): the package itself imports nothing, so reading a GGUF
header (:mod:`rbee.hive.gguf`) does not start FastAPI.
"""
