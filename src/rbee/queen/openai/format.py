"""The OpenAI objects of one answer: a chat or text completion, whole or as stream chunks."""

from __future__ import annotations

from typing import Any

from rbee import __version__
from rbee.jobs.job import Job
from rbee.queen.openai.schema import Call
from rbee.queen.toolcalls import ToolCall, ToolCallScanner
from rbee.queen.toolcalls import parse as parse_tool_calls
from rbee.queen.tools import MAX_TOOLS, CallStream, parse_tool_call, tool_call_id
from rbee.queen.translate import dumps

__all__ = ["DONE_FRAME", "Format", "finish_reason", "usage_of"]

DONE_FRAME = b"data: [DONE]\n\n"


def finish_reason(end: dict[str, Any]) -> str:
    return "length" if end.get("stop_reason") == "max_tokens" else "stop"


def usage_of(end: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """The usage of a job, or of ``n`` jobs of one prompt (counted once)."""
    prompt = int(end.get("tokens_in") or 0)
    completion = sum(int(e.get("tokens_out") or 0) for e in (end, *more))
    cached = min(prompt, int(end.get("tokens_reused") or 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Format:
    """The OpenAI objects of one answer (chat or text completion)."""

    def __init__(self, call: Call, job: Job, index: int = 0) -> None:
        #: The choice this answers (``n`` > 1: one per job, all with the first job's id).
        self.index = index
        self.chat = call.chat
        self.include_usage = call.include_usage
        #: The answer is a tool call (streamed as tool-call deltas).
        self.calls = CallStream() if call.tools is not None and call.tools.calls else None
        #: The answer may hold calls in the model's own format (``tool_choice`` auto with its template).
        self.names = [f["name"] for f in call.tools.functions] if call.template_tools and call.tools else None
        self.scanner = ToolCallScanner(self.names) if self.names is not None else None
        self._max_calls = 1 if call.tools is not None and not call.tools.parallel else MAX_TOOLS
        self._calls_sent = 0
        uid = job.id.removeprefix("job-").replace("-", "")
        self.id = f"chatcmpl-{uid}" if call.chat else f"cmpl-{uid}"
        self.created = int(job.created_at)
        self.model = call.model
        self.object = "chat.completion.chunk" if call.chat else "text_completion"
        head = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"rbee-{__version__}-{call.op.model}",
        }
        #: Where the next token starts in the text (a completion's ``text_offset``).
        self._offset = 0
        head_json = dumps(head)[:-1]
        usage_tail = ',"usage":null' if self.include_usage else ""
        if call.chat:
            self._token_prefix = f'data: {head_json},"choices":[{{"index":{self.index},"delta":{{"content":'
            self._token_suffix = f'}},"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n'
        else:
            self._token_prefix = f'data: {head_json},"choices":[{{"text":'
            self._token_suffix = f',"index":{self.index},"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n'
        self._head = head

    # streaming

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = ...) -> bytes:
        obj = {**self._head, "choices": choices}
        if usage is not ...:
            obj["usage"] = usage
        elif self.include_usage:
            obj["usage"] = None
        return f"data: {dumps(obj)}\n\n".encode()

    def opening(self) -> bytes | None:
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": None if self.calls is not None else ""}
        return self._chunk([{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _call_chunks(self, deltas: list[dict[str, Any]]) -> bytes:
        return b"".join(
            self._chunk([{"index": self.index, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}])
            for d in deltas
        )

    def _scanned(self, items: list[str | ToolCall]) -> bytes:
        """The model's text as content deltas and its calls as tool-call deltas (id, type and name, then
        the arguments)."""
        out = []
        for item in items:
            if isinstance(item, str):
                if item:
                    out.append(self._content_chunk(item))
            elif self._calls_sent < self._max_calls:
                at = self._calls_sent
                self._calls_sent += 1
                head = {"index": at, "id": item.id or tool_call_id(), "type": "function"}
                out.append(self._call_chunks([{**head, "function": {"name": item.name, "arguments": ""}}]))
                out.append(self._call_chunks([{"index": at, "function": {"arguments": item.arguments}}]))
        return b"".join(out)

    def _content_chunk(self, text: str) -> bytes:
        return (self._token_prefix + dumps(text) + self._token_suffix).encode()

    def token(self, token: str | tuple[str, list[dict[str, Any]] | None]) -> bytes:
        text, lp = (token, None) if isinstance(token, str) else token
        if self.calls is not None:
            return self._call_chunks(self.calls.feed(text))
        if self.scanner is not None:
            return self._scanned(self.scanner.feed(text))
        if lp is None:
            return (self._token_prefix + dumps(text) + self._token_suffix).encode()
        logprobs = self.logprobs(lp)
        if self.chat:
            return self._chunk(
                [{"index": self.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}]
            )
        return self._chunk([{"text": text, "index": self.index, "logprobs": logprobs, "finish_reason": None}])

    def logprobs(self, lp: list[dict[str, Any]]) -> dict[str, Any]:
        """The worker's entries (OpenAI's chat shape) as this answer's ``logprobs`` object."""
        if self.chat:
            return {"content": lp, "refusal": None}
        offsets = []
        for entry in lp:
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in lp],
            "token_logprobs": [e["logprob"] for e in lp],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in lp],
            "text_offset": offsets,
        }

    def closing(self, end: dict[str, Any]) -> bytes:
        reason = finish_reason(end)
        if self.calls is not None:
            if self.calls.name is None:  # cut short before the name: what there is, as text
                text = self.calls.text
                head = self._chunk(
                    [{"index": self.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
                )
                return head + self._chunk(
                    [{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}]
                )
            tail = self._call_chunks(self.calls.finish())
            reason = "tool_calls" if reason == "stop" else reason
            return tail + self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if self.scanner is not None:
            tail = self._scanned(self.scanner.finish())
            reason = "tool_calls" if self._calls_sent else reason
            return tail + self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if self.chat:
            return self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        return self._chunk([{"text": "", "index": self.index, "logprobs": None, "finish_reason": reason}])

    def usage(self, end: dict[str, Any], *more: dict[str, Any]) -> bytes:
        return self._chunk([], usage=usage_of(end, *more))

    # not streaming

    def whole(self, text: str, end: dict[str, Any], lp: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        reason = finish_reason(end)
        logprobs = None if lp is None else self.logprobs(lp)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            call = parse_tool_call(text) if self.calls is not None else None
            if call is not None and self.calls is not None:
                function = {"name": call[0], "arguments": call[1]}
                tool_calls = [{"id": self.calls.id, "type": "function", "function": function}]
                message = {**message, "content": None, "tool_calls": tool_calls}
                reason = "tool_calls"
            parsed = parse_tool_calls(text, self.names) if self.names is not None else None
            if parsed is not None and parsed.calls:
                tool_calls = [
                    {
                        "id": found.id or tool_call_id(),
                        "type": "function",
                        "function": {"name": found.name, "arguments": found.arguments},
                    }
                    for found in parsed.calls[: self._max_calls]
                ]
                message = {**message, "content": parsed.content or None, "tool_calls": tool_calls}
                reason = "tool_calls"
            choice = {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": reason}
            obj = {**self._head, "object": "chat.completion"}
        else:
            choice = {"text": text, "index": self.index, "logprobs": logprobs, "finish_reason": reason}
            obj = dict(self._head)
        return {**obj, "choices": [choice], "usage": usage_of(end)}
