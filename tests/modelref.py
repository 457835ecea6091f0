"""llama-cpp-python's own ``Llama`` as the reference for the real model, set up as rbee's worker runs llama.cpp.

:func:`reference_llama` is :func:`bench._util.llama_like_rbee` (repacking, tiled matmul
and flash attention as in the worker); :func:`visible` drops the media markers
(``<start_of_image>``) that llama-cpp-python renders as text and rbee never emits. The
benchmarks use the same two.
"""

from __future__ import annotations

from bench._util import llama_like_rbee as reference_llama
from bench._util import visible

__all__ = ["reference_llama", "visible"]
