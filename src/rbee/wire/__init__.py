"""The job API's wire, standard library only: what both ends of an rbee connection share.

* :mod:`rbee.wire.protocol`: paths, headers, event names, job ids, ``[DONE]``;
* :mod:`rbee.wire.sse`: the one server-sent events decoder (sans IO) and the event type;
* :mod:`rbee.wire.errors`: a remote error rebuilt as its :class:`~rbee.errors.RbeeError`;
* :mod:`rbee.wire.http1`: the small HTTP/1.1 client of the hot job requests.

The keeper imports these on every run, so this package imports none of them
itself and none of them imports more than the standard library and
:mod:`rbee.errors`.
"""
