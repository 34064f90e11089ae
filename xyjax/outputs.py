"""What ``LLM.generate`` returns for each prompt."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestOutput:
    """The result of one request.

    ``finish_reason`` is "stop" (EOS, stop token or stop string), "length" (max_tokens or the context
    length), "abort" or "error" (then ``error`` says why); None while the request is still running.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
