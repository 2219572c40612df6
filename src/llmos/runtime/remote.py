"""The engine and backend interface the API uses, for a model that runs in another process.

Contract: an :class:`EngineClient` answers what the API asks of an :class:`~llmos.engine.core.EngineCore`
(``submit``, ``abort``, ``stats``, ``alive``, ``outstanding``, ``max_context``, ``check_fits``, ``crashed``,
``shutdown``) and a :class:`BackendClient` what it asks of a backend (``n_vocab``, ``n_seq_max``, ``backend_name``,
``tokenize``, ``detokenize``, ``token_bytes``, the last cached); generation itself (sampling, decoding) never runs
on this side. Both transports subclass them: local model processes (:mod:`llmos.runtime.model_process`) and Ray
replica actors (:mod:`llmos.distributed.serving`), so a :class:`~llmos.runtime.model.LoadedModel` looks the same to
the API whichever runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from llmos.engine.backends.base import BatchItem, SequenceSampler, TokenLogprob
from llmos.engine.core import EngineCore, EngineStats
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import OutputStream
from llmos.errors import ContextLengthExceededError
from llmos.types import SamplingParams


class EngineClient:
    def __init__(self, name: str, max_context: int) -> None:
        self.name = name
        self.max_context = max_context
        self.crashed: str | None = None
        """Why the engine on the other side is gone (None while it serves)."""
        self._closed = False

    def check_fits(self, prompt_tokens: int, max_tokens: int | None = None) -> None:
        EngineCore.check_fits(cast(EngineCore, self), prompt_tokens, max_tokens)

    def check_request(self, request: GenerationRequest) -> None:
        """What :meth:`EngineCore.submit` refuses before queueing, refused here without a round trip."""
        if not request.prompt_tokens:
            raise ContextLengthExceededError("the prompt is empty after tokenization", param="prompt")
        self.check_fits(len(request.prompt_tokens))

    @property
    def alive(self) -> bool:
        return self.crashed is None and not self._closed

    @property
    def outstanding(self) -> int:
        raise NotImplementedError

    def submit(self, request: GenerationRequest, stream: OutputStream) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def shutdown(self, timeout: float = 30.0) -> None:
        raise NotImplementedError


class BackendClient:
    def __init__(self, info: dict[str, Any], backend_name: str) -> None:
        self.n_vocab: int = info["n_vocab"]
        self.n_seq_max: int = info["n_seq_max"]
        self.backend_name = backend_name
        self._token_bytes: dict[int, bytes] = {}

    def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return cast(list[int], self._call("tokenize", text, add_special, parse_special))

    def token_bytes(self, token: int) -> bytes:
        if token not in self._token_bytes:
            self._token_bytes[token] = self._call("token_bytes", token)
        return self._token_bytes[token]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return cast(str, self._call("detokenize", list(tokens)))

    def is_end_of_generation(self, token: int) -> bool:
        raise NotImplementedError("generation runs in the model's own process")

    def new_sampler(self, params: SamplingParams, grammar: str | None = None) -> SequenceSampler:
        raise NotImplementedError("generation runs in the model's own process")

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]:
        raise NotImplementedError("generation runs in the model's own process")

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        raise NotImplementedError("generation runs in the model's own process")

    def forget_sequence(self, seq_id: int) -> None:
        return None

    def close(self) -> None:
        return None
