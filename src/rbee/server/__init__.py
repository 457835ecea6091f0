"""The HTTP edge every server shares: the SSE stream writer (:mod:`rbee.server.sse`).

Nothing is imported here, so a module that needs one piece loads only that piece.
"""
