"""NullEngine: the engine interface with no model behind it -- instant, correctly shaped, meaningless answers.

**It computes nothing.** Every forward pass returns zero logprobs and losses, every sample returns
``max_tokens`` (default 16) copies of token 0 with logprob 0, and an optimizer step only counts. It exists for
two purposes:

* client-overhead benchmarks, where the server's compute would drown the client cost being measured;
* the server's own protocol tests, which check routing, ordering, futures and storage -- not numbers.

It advertises a single model, ``null/instant``, so nobody mistakes its answers for a model's. Its checkpoints
are small but real safetensors files (one zero tensor) so the store, archives and restarts work end to end.
Same constructor and methods as ``engine.Engine`` (``engine_api.EngineAPI``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import types
from .._errors import BadRequestError, NotFoundError
from .engine_api import (
    FULL_PARAM,
    AdamStep,
    Batch,
    EngineAPI,
    SampleJob,
    check_adam,
    check_batch,
    check_lora,
    check_sample,
)
from .models import ModelSpec

__all__ = ("NULL_MODEL", "NullEngine")

NULL_MODEL = "null/instant"
_SPEC = ModelSpec(
    name=NULL_MODEL,
    path=Path("/nonexistent/null-engine"),
    arch="null",
    vocab_size=1 << 20,
    max_context=1 << 16,
)
_DEFAULT_MAX_TOKENS = 16


@dataclass(slots=True)
class _Run:
    base_model: str
    rank: int
    steps: int = 0


class NullEngine:
    """Answers every engine call at once with zeros (see the module docstring). Thread-safe."""

    def __init__(
        self, models: Sequence[str] = (), *, builtin: bool = True, device: str | None = None
    ) -> None:
        del models, builtin, device  # the Engine's constructor; there is nothing to load
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    # -------------------------------------------------------------------------------------------- models

    def supported_models(self) -> list[types.SupportedModel]:
        return [types.SupportedModel(model_name=NULL_MODEL, max_context_length=_SPEC.max_context)]

    def has_model(self, base_model: str) -> bool:
        return base_model == NULL_MODEL

    def spec(self, base_model: str) -> ModelSpec:
        if base_model != NULL_MODEL:
            raise BadRequestError(f"unknown base_model {base_model!r}; this server has: {NULL_MODEL}")
        return _SPEC

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no model {run_id!r} is loaded on this server")
        return run

    # -------------------------------------------------------------------------------------------- training

    def validate_batch(
        self,
        run_id: str,
        data: Sequence[types.Datum],
        loss_fn: str,
        config: Mapping[str, float] | None = None,
    ) -> Batch:
        return check_batch(
            data, loss_fn, vocab_size=_SPEC.vocab_size, max_context=_SPEC.max_context, config=config
        )

    def create_run(
        self, run_id: str, base_model: str, lora: types.LoraConfig, *, frozen: bool = False
    ) -> None:
        self.spec(base_model)
        lora = FULL_PARAM if frozen else check_lora(lora)
        with self._lock:
            if run_id in self._runs:
                raise BadRequestError(f"model {run_id!r} already exists")
            self._runs[run_id] = _Run(base_model=base_model, rank=lora.rank)

    def unload(self, run_id: str) -> None:
        with self._lock:
            self._run(run_id)
            del self._runs[run_id]

    def forward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str, *, reference: bool = False
    ) -> types.ForwardBackwardOutput:
        run = self._run(run_id)
        batch = data if isinstance(data, Batch) else self.validate_batch(run_id, data, loss_fn)
        outputs = []
        for ids in batch.fields["input_ids"]:
            n = len(ids)
            zeros = np.zeros(n, dtype=np.float32)
            outputs.append(
                {
                    "logprobs": types.TensorData(data=zeros, dtype="float32", shape=[n]),
                    "elementwise_loss": types.TensorData(data=zeros, dtype="float32", shape=[n]),
                }
            )
        metrics = {"loss:mean": 0.0, "num_examples:sum": float(len(batch)), "step:max": float(run.steps)}
        return types.ForwardBackwardOutput(
            loss_fn_output_type=batch.loss_fn, loss_fn_outputs=outputs, metrics=metrics
        )

    def forward_backward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str
    ) -> types.ForwardBackwardOutput:
        return self.forward(run_id, data, loss_fn)

    def optim_step(self, run_id: str, adam: types.AdamParams | AdamStep) -> types.OptimStepResponse:
        run = self._run(run_id)
        step = check_adam(adam)
        run.steps += 1
        metrics = {
            "step:max": float(run.steps),
            "learning_rate:mean": step.learning_rate,
            "recent_loss:mean": 0.0,
        }
        return types.OptimStepResponse(metrics=metrics)

    # -------------------------------------------------------------------------------------------- checkpoints

    def save(
        self, run_id: str, directory: str | Path, *, optimizer: bool = True, merged: bool = False
    ) -> None:
        from safetensors.numpy import save_file

        run = self._run(run_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {"null.lora_A.weight": np.zeros((max(run.rank, 1), 1), np.float32)},
            str(out / "adapter_model.safetensors"),
        )
        rank = 0 if merged else run.rank  # merged: full weights, the layout of a full-parameter run
        meta = {"null_engine": True, "base_model": run.base_model, "rank": rank, "steps": run.steps}
        (out / "engine.json").write_text(json.dumps({**meta, "optimizer": optimizer}))

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        run = self._run(run_id)
        try:
            meta = json.loads((Path(directory) / "engine.json").read_text())
        except (OSError, ValueError):
            raise BadRequestError(f"{directory} is not a checkpoint written by this engine") from None
        if meta.get("base_model") != run.base_model or meta.get("rank") != run.rank:
            raise BadRequestError(
                f"checkpoint is base model {meta.get('base_model')!r} rank {meta.get('rank')}, but model "
                f"{run_id!r} is {run.base_model!r} rank {run.rank}; create the model with the same base "
                "model and rank"
            )
        if optimizer and not meta.get("optimizer"):
            raise BadRequestError(
                "this checkpoint has no optimizer state (a sampler checkpoint?); load it without"
            )
        run.steps = int(meta.get("steps") or 0) if optimizer else 0  # a fresh optimizer starts at step 0

    # -------------------------------------------------------------------------------------------- sampling

    def validate_save(self, run_id: str, *, merged: bool) -> None:
        self._run(run_id)

    def validate_sample(self, job: SampleJob) -> SampleJob:
        self.spec(job.base_model)
        return check_sample(job, vocab_size=_SPEC.vocab_size, max_context=_SPEC.max_context)

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        out = []
        for job in jobs:
            n = job.params.max_tokens if job.params.max_tokens is not None else _DEFAULT_MAX_TOKENS
            seqs = [
                types.SampledSequence(stop_reason="length", tokens=[0] * n, logprobs=[0.0] * n)
                for _ in range(job.num_samples)
            ]
            prompt_lp: list[float | None] | None = None
            if job.prompt_logprobs:
                prompt_lp = [None, *([0.0] * (job.prompt.length - 1))]
            topk: list[list[tuple[int, float]] | None] | None = None
            if job.topk_prompt_logprobs:
                topk = [None, *([[(0, 0.0)] * job.topk_prompt_logprobs] * (job.prompt.length - 1))]
            out.append(
                types.SampleResponse(sequences=seqs, prompt_logprobs=prompt_lp, topk_prompt_logprobs=topk)
            )
        return out


if TYPE_CHECKING:
    _conforms: EngineAPI = NullEngine()  # mypy checks that NullEngine has the engine interface
