"""llama-cpp-python's own ``Llama`` as the reference for the real model, set up as rbee's worker runs llama.cpp.

* Weight repacking as the worker chooses it (:func:`rbee.worker.engine.repack_default`:
  off on Intel AMX CPUs, where llama.cpp's AMX kernels crash at the first decode).
  ``Llama`` has no parameter for it, so its model parameters are patched while it loads.
* ggml's tiled CPU matmul off, as in the worker (batch-invariant sums); ggml reads the
  switch once per process, so it is set before any model runs here.
* Flash attention on, as llama.cpp's default (``auto``) resolves on the CPU and the
  worker leaves it (``Llama`` turns it off unless asked).
* :func:`visible` drops the media markers (``<start_of_image>``) that llama-cpp-python
  renders as text and rbee never emits.
"""

from __future__ import annotations

import os
import re
from typing import Any

_MARKERS = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]")


def reference_llama(model_path: str, **kwargs: Any) -> Any:
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    import llama_cpp.llama_cpp as low

    from rbee.worker.engine import repack_default

    defaults = low.llama_model_default_params
    repack = repack_default()

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = repack
        return p

    from llama_cpp import Llama

    low.llama_model_default_params = params
    try:
        return Llama(model_path=model_path, verbose=False, **{"flash_attn": True, **kwargs})
    finally:
        low.llama_model_default_params = defaults


def visible(text: str) -> str:
    return _MARKERS.sub("", text)
