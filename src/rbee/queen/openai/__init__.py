"""The OpenAI-compatible API on the queen: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Every request becomes an ordinary ``infer`` job in the queen's registry, so it
is admitted, scheduled, queued, narrated, cancellable (``DELETE /v1/jobs/{id}``)
and kept in the history like any other; the ``x-rbee-job-id`` header names it.
The endpoints read the job's events in process and translate them:

* not streaming: the answer is sent once the job has ended;
* streaming: the response starts with the first token (or the end, whichever
  comes first), so anything that fails before a token is generated -- a worker
  that refuses the prompt, a queue that overflowed -- is still answered with a
  proper status. After that, a failure is sent as an error chunk
  (``data: {"error": {...}}``) and the stream closes without ``[DONE]``.

A client that goes away cancels its job, which frees the worker.

Defaults follow OpenAI's: ``temperature`` 1, ``top_p`` 1, ``n`` 1; ``max_tokens``
defaults to 16 for completions (as OpenAI documents); a chat without it generates
until the slot's context is full, as llama.cpp's server does: ``max_tokens`` becomes
what the smallest context of the model's ready workers (``n_ctx`` of their reports)
leaves after the prompt, as one of them counts it (``POST /v1/tokens/count``), and the
job is marked ``to_the_context`` so the worker that runs it (the first one may still be
starting) bounds it by its own context. llama.cpp's
``n_predict`` is ``max_tokens`` (negative: to the end of the context). An input too long
for the context is OpenAI's ``context_length_exceeded`` (``param`` messages or prompt).
Each option is enforced in the worker's native sampler chain of the sequence:
``response_format`` (``json_object``; ``json_schema``, compiled to a GBNF grammar)
and llama.cpp's own ``grammar`` (GBNF) and ``json_schema``; ``presence_penalty``,
``frequency_penalty``, llama.cpp's ``repeat_penalty`` (over the last 64 tokens);
``logit_bias`` (ids checked against the model's vocabulary); ``min_p``, ``top_k``,
``seed``; ``logprobs`` with ``top_logprobs`` 0..20 (chats) or ``logprobs`` 0..5
(completions), from the model's logits before the chain. A grammar, schema or
token id the worker cannot use is a ``400`` naming the field. ``usage`` has
``prompt_tokens_details.cached_tokens`` (prompt tokens the worker's slot already
held), answers a ``system_fingerprint`` and an ``x-request-id`` header.

Tools: ``tool_choice`` ``required`` or a named function makes the answer a call,
generated under the call's JSON schema (``{"name": const, "arguments": <parameters>}``
of one of the functions, given to the job as ``json_schema``) and answered as
``message.tool_calls`` with ``finish_reason: "tool_calls"`` (streamed as tool-call
deltas: id, type and name first, then the arguments' text). The functions are told
to the model in the system turn. ``none`` answers text. ``auto`` (the default with
tools) gives the tools to a model whose own chat template renders them (the hive's
catalog reads that from the GGUF: ``chat_tools``) and reads its calls from the answer in
its family's format (:mod:`rbee.queen.toolcalls`: Hermes/Qwen ``<tool_call>``, Llama's
JSON, Mistral's ``[TOOL_CALLS]``): ``message.tool_calls`` with any text before them as
``content`` and ``finish_reason: "tool_calls"``; streamed, the text is sent until a
call opens, then each call as tool-call deltas once it is complete
(``parallel_tool_calls: false`` keeps the first). With any other model ``auto``
answers as ``none`` and the job's narration says so (``openai_tools_auto``). Infer's
turns are system, user and assistant only, so a tool result (``role: tool``) is rendered
here as a user turn ``Tool result (name): ...`` and an assistant's ``tool_calls`` as
their JSON; the worker is unchanged.

``n`` (1..8) runs one job a choice (seeds ``seed + i`` when a seed is given), answers
the choices with their ``index`` and ``usage`` summed (the prompt counted once),
interleaves the streamed chunks, and cancels them all when the client goes;
``x-rbee-job-id`` names the first job, ``x-rbee-job-ids`` all.

Body parameters are taken as OpenAI takes them: one that is not part of the endpoint's
API is a ``400`` ``unknown_parameter`` naming it ("Unrecognized request argument
supplied: foo"); one of OpenAI's that rbee cannot honour (``audio``, ``modalities``
other than text, ``prediction``, ``web_search_options``, ``reasoning_effort``,
``store: true``, ``best_of`` > 1, ``echo``, the deprecated ``functions``) and llama.cpp's
samplers rbee lacks (``mirostat``, ``typical_p``...) are a ``400``
``unsupported_parameter`` naming it and saying why. The informational ones (``user``,
``metadata``, ``store: false``, ``service_tier``, ``prompt_cache_key``,
``safety_identifier``, llama.cpp's ``cache_prompt``) are accepted, and so are
llama.cpp's own that rbee honours (``grammar``, ``json_schema``, ``n_predict``,
``min_p``, ``repeat_penalty``, ``top_k``) and Ollama's ``keep_alive``.

The package: :mod:`~rbee.queen.openai.schema` (the body's rules, the job to run),
:mod:`~rbee.queen.openai.messages` (a chat's turns), :mod:`~rbee.queen.openai.format`
(answers and chunks), :mod:`~rbee.queen.openai.errors` (OpenAI's error shape) and
:mod:`~rbee.queen.openai.routes`; what the other APIs share with it is in
:mod:`rbee.queen.translate` and :mod:`rbee.queen.tools`.
"""

from __future__ import annotations

from rbee.queen.openai.errors import openai_error_body
from rbee.queen.openai.routes import openai_router
from rbee.queen.openai.schema import DEFAULT_COMPLETION_MAX_TOKENS
from rbee.queen.translate import DEFAULT_CHAT_MAX_TOKENS, JOB_ID_HEADER

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "JOB_ID_HEADER",
    "openai_error_body",
    "openai_router",
]
