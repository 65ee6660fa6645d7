"""DeploymentSampler: chat conversations in, completions with tokens and logprobs out (Fireworks' sampler).

``ServiceClient.create_deployment_sampler(model_path, tokenizer=..., concurrency_controller=...)`` returns
one. ``await sampler.sample_with_tokens(messages=..., n=K, max_tokens=...)`` applies the tokenizer's chat
template to each conversation (with the generation prompt), sends the K samples of each as K concurrent
requests of one sample each -- through the concurrency controller, which bounds and adapts how many are in
flight -- and returns one ``SampledCompletion`` per sample: its text, tokens and logprobs. It is a coroutine,
so a synchronous script calls it with ``asyncio.run(...)`` (as Fireworks' guide does, once per eval step).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ._errors import ConfigurationError
from ._tokenizer import load_tokenizer
from ._wire import shorten
from .sampling import SamplingClient
from .types import ModelInput, SampleResponse, SamplingParams

__all__ = ("DeploymentSampler", "SampledCompletion")

Conversation = Sequence[Mapping[str, Any]]


class SampledCompletion(msgspec.Struct, kw_only=True, frozen=True):
    """One sampled completion of one conversation.

    ``text`` is ``tokens`` decoded (special tokens left out); ``logprobs`` the logprob of each token under
    the model (at temperature 1, as the server computes them); ``prompt_tokens`` the templated prompt;
    ``finish_reason`` ``"stop"`` or ``"length"``; ``prompt_index`` which conversation of ``messages`` it
    continues (0 for a single one). ``full_tokens``, ``prompt_len``, ``completion_len`` and
    ``inference_logprobs`` read as in Fireworks' ``SampledCompletion``.
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    prompt_tokens: list[int]
    finish_reason: str
    prompt_index: int = 0

    @property
    def full_tokens(self) -> list[int]:
        return [*self.prompt_tokens, *self.tokens]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_tokens)

    @property
    def completion_len(self) -> int:
        return len(self.tokens)

    @property
    def inference_logprobs(self) -> list[float]:
        return self.logprobs


class DeploymentSampler:
    """Samples chat conversations from a model (see the module docstring).

    ``sampling_client`` does the sampling (its ``concurrency_controller`` bounds the requests in flight);
    ``tokenizer`` is a Hugging Face tokenizer with a chat template, or None to load the one of
    ``base_model`` on first use.
    """

    def __init__(
        self, sampling_client: SamplingClient, tokenizer: Any = None, *, base_model: str | None = None
    ) -> None:
        if tokenizer is None and base_model is None:
            raise ConfigurationError(
                "a DeploymentSampler needs a tokenizer: pass tokenizer= (a Hugging Face tokenizer with a "
                "chat template) or base_model= (whose tokenizer is loaded)"
            )
        self.sampling_client = sampling_client
        self._tokenizer = tokenizer
        self._base_model = base_model

    @property
    def concurrency_controller(self) -> Any:
        return self.sampling_client.concurrency_controller

    def __repr__(self) -> str:
        client = self.sampling_client
        return f"DeploymentSampler(model_path={client.model_path!r}, base_model={client.base_model!r})"

    async def tokenizer(self) -> Any:
        """The tokenizer (loaded in a thread on first use when none was given)."""
        if self._tokenizer is None:
            assert self._base_model is not None
            self._tokenizer = await asyncio.to_thread(load_tokenizer, self._base_model)
        return self._tokenizer

    async def sample_with_tokens(
        self,
        messages: Conversation | Sequence[Conversation],
        n: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        *,
        top_p: float = 1.0,
        top_k: int = -1,
        stop: str | list[str | int] | None = None,
        seed: int | None = None,
    ) -> list[SampledCompletion]:
        """``n`` completions of each conversation, as ``n`` concurrent requests per conversation.

        ``messages`` is one conversation (a list of ``{"role", "content"}`` dicts) or a list of them; the
        completions come back conversation by conversation, ``n`` each, in order (``prompt_index`` tells
        which). With ``seed``, completion i of a conversation is sampled with seed ``seed + i``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"n must be a positive integer, got {n!r}")
        conversations = _conversations(messages)
        tokenizer = await self.tokenizer()
        prompts = [
            _prompt_ids(tokenizer, conv, i, len(conversations) > 1) for i, conv in enumerate(conversations)
        ]
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                stop=stop,
                seed=None if seed is None else seed + i,
            )
            for i in range(n)
        ]
        client = self.sampling_client
        tasks = [
            asyncio.ensure_future(client.sample_async(ModelInput.from_ints(prompt), 1, p))
            for prompt in prompts
            for p in params
        ]
        try:
            responses: list[SampleResponse] = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed (or the caller cancelled): the others are not wanted any more
                task.cancel()
            await asyncio.wait(tasks)
            raise
        out = []
        for k, response in enumerate(responses):
            i = k // n
            seq = response.sequences[0]
            text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
            out.append(
                SampledCompletion(
                    text=text,
                    tokens=list(seq.tokens),
                    logprobs=list(seq.logprobs or ()),
                    prompt_tokens=prompts[i],
                    finish_reason=seq.stop_reason,
                    prompt_index=i,
                )
            )
        return out


def _conversations(messages: Any) -> list[Conversation]:
    """``messages`` as a list of conversations: one conversation (a list of dicts) or a list of them."""
    fix = "give one conversation, a list of {'role': ..., 'content': ...} dicts, or a list of conversations"
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence) or not messages:
        raise ConfigurationError(f"messages: {shorten(messages)} is not a conversation; {fix}")
    if all(isinstance(m, Mapping) for m in messages):
        return [messages]
    for i, conv in enumerate(messages):
        ok = isinstance(conv, Sequence) and not isinstance(conv, str | bytes) and len(conv) > 0
        if not ok or not all(isinstance(m, Mapping) for m in conv):
            raise ConfigurationError(f"messages[{i}]: {shorten(conv)} is not a conversation; {fix}")
    return list(messages)


def _prompt_ids(tokenizer: Any, conversation: Conversation, index: int, many: bool) -> list[int]:
    """The conversation through the tokenizer's chat template (with the generation prompt), as token ids."""
    where = f"messages[{index}]" if many else "messages"
    try:
        text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
    except Exception as exc:
        raise ConfigurationError(
            f"{where}: the tokenizer's apply_chat_template failed ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the tokenizer needs a chat template (set tokenizer.chat_template to a Jinja "
            "template) that accepts these messages"
        ) from exc
    if not ids:
        raise ConfigurationError(f"{where}: the chat template made an empty prompt")
    return [int(t) for t in ids]
