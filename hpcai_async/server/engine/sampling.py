"""Batched sampling on a base model (with or without an adapter): rows, prefill, decode steps, stop checks.

``temperature`` 0 is greedy; ``top_k`` -1 is off; ``max_tokens`` None means ``DEFAULT_MAX_TOKENS`` or up to
the context end if that comes first (stop_reason "length"). ``stop``: None stops at EOS; a list of strings
stops when the decoded completion contains one of them (EOS also stops); a list of token ids stops at those
ids only; ``[]`` disables every stop. The token that completes a stop (string or id, EOS too) is the last
token returned. Sampled logprobs are log-softmax at temperature 1 of the raw logits; so are the prompt
logprobs and, with ``topk_prompt_logprobs=k``, the k most likely tokens at each prompt position, both from
the prompt's own forward pass (the prefill). With a seed, sample i of a job draws from its own generator
seeded by (seed, i), so its tokens do not depend on the other jobs in the batch (up to float rounding of
batched matmuls).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ... import types
from ..engine_api import SampleJob
from .adapters import Base
from .training import target_logprobs

__all__ = ("DEFAULT_MAX_TOKENS", "sample_group")

DEFAULT_MAX_TOKENS: Final = 256  # max_tokens=None: a bounded default rather than "until the context ends"


@dataclass(slots=True)
class _Row:
    """One sample being generated; the rows of a job are adjacent."""

    job: int
    prompt: npt.NDArray[np.int64]
    max_new: int
    stop_ids: frozenset[int]
    stop_strs: tuple[str, ...]
    uniforms: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: types.StopReason = "length"


class _StopText:
    """Checks stop strings on the decoded tail of a completion (only the tail can hold a new match)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def hit(self, row: _Row) -> bool:
        # n characters span at most 4n byte-level tokens; an earlier match would have stopped the row
        window = 4 * max(len(s) for s in row.stop_strs) + 2
        text = self.tokenizer.decode(
            row.tokens[-window:], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return any(s in text for s in row.stop_strs)


def _stops(stop: str | list[str | int] | None, eos: frozenset[int]) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return eos, ()
    if isinstance(stop, str):
        return eos, (stop,)
    if not stop:
        return frozenset(), ()
    if isinstance(stop[0], str):
        return eos, tuple(str(s) for s in stop)
    return frozenset(int(s) for s in stop), ()


def _uniforms(seed: int, index: int, n: int) -> npt.NDArray[np.float64]:
    """The uniform draws of sample ``index`` of a job seeded ``seed``, from a generator of its own."""
    import torch

    entropy = np.random.SeedSequence([seed & (2**64 - 1), index]).generate_state(1, np.uint64)[0]
    gen = torch.Generator(device="cpu").manual_seed(int(entropy) >> 1)
    out: npt.NDArray[np.float64] = torch.rand(n, generator=gen, dtype=torch.float64).numpy()
    return out


def _pick(logits: Any, temp: Any, top_k: Any, top_p: Any, u: Any) -> Any:
    """Per-row temperature / top-k / top-p sampling by inverse CDF on the row's own uniform draw ``u``."""
    import torch

    greedy = temp <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[-1], device=values.device)
    keep = ranks[None, :] < top_k[:, None]
    probs = torch.softmax(values.masked_fill(~keep, -math.inf), dim=-1)
    cum = probs.cumsum(dim=-1)
    keep &= (cum - probs) < top_p[:, None]  # nucleus: the top token is always kept
    cdf = probs.masked_fill(~keep, 0.0).double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True).clamp(max=values.shape[-1] - 1)
    sampled = order.gather(1, index)[:, 0]
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _rows(base: Base, jobs: list[SampleJob]) -> list[_Row]:
    """One row per sample, each with its token budget, stops and uniform draws."""
    loaded = base.loaded
    rows: list[_Row] = []
    for j, job in enumerate(jobs):
        prompt = job.prompt_ids
        assert prompt is not None, "sampling takes jobs checked by engine_api.check_sample"
        p = job.params
        budget = loaded.spec.max_context - len(prompt)
        max_new = min(p.max_tokens if p.max_tokens is not None else DEFAULT_MAX_TOKENS, budget)
        stop_ids, stop_strs = _stops(p.stop, loaded.eos_token_ids)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        for i in range(job.num_samples):
            row = _Row(job=j, prompt=prompt, max_new=max_new, stop_ids=stop_ids, stop_strs=stop_strs)
            row.uniforms = _uniforms(seed, i, max_new)
            rows.append(row)
    return rows


@dataclass(slots=True)
class _Decoder:
    """The batch's tensors: left-padded prompts, per-row sampling settings, the KV cache as it grows."""

    base: Base
    rows: list[_Row]
    temp: Any
    top_k: Any
    top_p: Any
    u: Any
    attn: Any
    pos: Any = None
    cache: Any = None

    @classmethod
    def build(cls, base: Base, jobs: list[SampleJob], rows: list[_Row]) -> tuple[_Decoder, Any]:
        import torch

        loaded, device = base.loaded, base.loaded.device
        width = max(len(r.prompt) for r in rows)
        steps = max(r.max_new for r in rows)
        ids = np.full((len(rows), width), loaded.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        uniforms = np.zeros((len(rows), steps), dtype=np.float64)
        for r, row in enumerate(rows):
            ids[r, width - len(row.prompt) :] = row.prompt
            mask[r, width - len(row.prompt) :] = 1
            uniforms[r, : row.max_new] = row.uniforms
        params = [jobs[r.job].params for r in rows]
        vocab = loaded.spec.vocab_size
        decoder = cls(
            base=base,
            rows=rows,
            temp=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            u=torch.from_numpy(uniforms).to(device),
            attn=torch.from_numpy(mask).to(device),
        )
        return decoder, torch.from_numpy(ids).to(device)

    def prefill(self, input_ids: Any, jobs: list[SampleJob]) -> tuple[Any, dict[int, _PromptScores]]:
        """Run the prompts; the last position's logits, and the prompt logprobs and top-k logprobs of the
        jobs that want them (from the same forward pass)."""
        base, rows = self.base, self.rows
        positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if base.keep_logits and not any(j.prompt_logprobs or j.topk_prompt_logprobs for j in jobs):
            kwargs["logits_to_keep"] = 1
        out = base.module(
            input_ids=input_ids, attention_mask=self.attn, position_ids=positions, use_cache=True, **kwargs
        )
        self.cache = getattr(out, base.cache_arg)
        self.pos = positions[:, -1:]
        width = input_ids.shape[1]
        scores: dict[int, _PromptScores] = {}
        for r, row in enumerate(rows):
            job = jobs[row.job]
            if (job.prompt_logprobs or job.topk_prompt_logprobs) and row.job not in scores:  # its first row
                n = len(row.prompt)
                logits = out.logits[r, width - n : width - 1]
                scores[row.job] = _prompt_scores(logits, input_ids[r, width - n + 1 :], job)
        return out.logits[:, -1, :].float(), scores

    def step(self, chosen: Any) -> Any:
        """Feed each row's chosen token; the next logits."""
        import torch

        base = self.base
        self.attn = torch.cat([self.attn, self.attn.new_ones((len(self.rows), 1))], dim=1)
        self.pos = self.pos + 1
        out = base.module(
            input_ids=chosen[:, None],
            attention_mask=self.attn,
            position_ids=self.pos,
            use_cache=True,
            **{base.cache_arg: self.cache},
        )
        self.cache = getattr(out, base.cache_arg)
        return out.logits[:, -1, :].float()


@dataclass(slots=True)
class _PromptScores:
    logprobs: list[float | None] | None = None
    topk: list[list[tuple[int, float]] | None] | None = None


def _prompt_scores(logits: Any, targets: Any, job: SampleJob) -> _PromptScores:
    """A job's prompt logprobs and top-k logprobs from its prompt's logits (position i predicts token i+1);
    entry 0 of each is None (the first token has no context)."""
    import torch

    scores = _PromptScores()
    if job.prompt_logprobs:
        scores.logprobs = [None, *target_logprobs(logits, targets).cpu().tolist()]
    k = min(job.topk_prompt_logprobs, logits.shape[-1])
    if k > 0:
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # most likely first
        pairs = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        scores.topk = [None, *pairs]
    return scores


def _advance(
    rows: list[_Row], live: list[int], toks: list[int], lps: list[float], hit: Callable[[_Row], bool]
) -> list[int]:
    """Append each live row's token; the rows still running (no stop hit, budget left)."""
    still = []
    for r in live:
        row = rows[r]
        t = toks[r]
        row.tokens.append(t)
        row.logprobs.append(lps[r])
        if t in row.stop_ids or (row.stop_strs and hit(row)):
            row.reason = "stop"
        elif len(row.tokens) >= row.max_new:
            row.reason = "length"
        else:
            still.append(r)
    return still


def sample_group(
    base: Base, jobs: list[SampleJob], tokenizer: Callable[[], Any]
) -> list[types.SampleResponse]:
    """Sample every job (one base model, one adapter, already active) as one batch."""
    import torch

    rows = _rows(base, jobs)
    stop_text = _StopText(tokenizer()) if any(r.stop_strs for r in rows) else None
    hit = stop_text.hit if stop_text is not None else (lambda row: False)
    decoder, input_ids = _Decoder.build(base, jobs, rows)
    with torch.inference_mode():
        last, scores = decoder.prefill(input_ids, jobs)
        live = list(range(len(rows)))
        for step in range(max(r.max_new for r in rows)):
            chosen = _pick(last, decoder.temp, decoder.top_k, decoder.top_p, decoder.u[:, step])
            chosen_lp = torch.log_softmax(last, dim=-1).gather(1, chosen[:, None])[:, 0]
            live = _advance(rows, live, chosen.tolist(), chosen_lp.tolist(), hit)
            if not live:
                break
            last = decoder.step(chosen)
    responses = []
    for j in range(len(jobs)):
        seqs = [
            types.SampledSequence(stop_reason=r.reason, tokens=r.tokens, logprobs=r.logprobs)
            for r in rows
            if r.job == j
        ]
        prompt = scores.get(j, _NO_SCORES)
        responses.append(
            types.SampleResponse(
                sequences=seqs, prompt_logprobs=prompt.logprobs, topk_prompt_logprobs=prompt.topk
            )
        )
    return responses


_NO_SCORES = _PromptScores()
