"""llama-cpp-python's own ``Llama`` as the reference for the real model, set up as rbee's worker runs llama.cpp.

:func:`reference_llama` is :func:`bench._util.llama_like_rbee` (repacking, tiled matmul
and flash attention as in the worker; the benchmarks use the same reference).
:func:`visible` drops the media markers (``<start_of_image>``) that llama-cpp-python
renders as text and rbee never emits.
"""

from __future__ import annotations

import re

from bench._util import llama_like_rbee as reference_llama

__all__ = ["reference_llama", "visible"]

_MARKERS = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]")


def visible(text: str) -> str:
    return _MARKERS.sub("", text)
