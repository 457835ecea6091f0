"""The worker: one process, one loaded model, the job API for ``infer``.

Import what you use from its modules (:mod:`rbee.worker.app`, :mod:`rbee.worker.engine`,
:mod:`rbee.worker.bridge` ...): the package itself imports nothing, so a module that
needs one of them does not load the app, FastAPI or llama.cpp with it.
"""
