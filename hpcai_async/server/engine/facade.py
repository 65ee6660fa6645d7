"""``Engine``: the engine the server talks to (``engine_api.EngineAPI``), a thin layer over the modules here.

It holds the base models and runs, takes the lock, checks requests with ``engine_api``'s rules (unless the
server already did: then it gets their checked form) and hands the work to ``training``, ``sampling``,
``adapters`` and ``checkpoint``.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import types
from ..._errors import BadRequestError, ConfigurationError, NotFoundError
from ..engine_api import (
    FULL_PARAM,
    AdamStep,
    Batch,
    EngineAPI,
    SampleJob,
    check_adam,
    check_batch,
    check_lora,
    check_lora_match,
    check_sample,
)
from ..models import BUILTIN_NAME, ModelSpec, quiet, resolve_model
from . import checkpoint, full, sampling, training
from .adapters import Base, Run, adapter_params, delete_adapter, inject, sampler_adapter, targets

__all__ = ("Engine",)


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_request")


class Engine:
    """LoRA and full-parameter training, and sampling, on local base models (``engine_api.EngineAPI``).

    ``models``: base models served next to the built-in one (folders holding config.json, or repo ids in the
    local Hugging Face cache). ``device``: "cpu", "cuda", "cuda:1" …; default cuda when available. Base models
    load on first use. The ``validate_*`` and metadata methods read only what the constructor fixed, so the
    server may call them from its event loop; the rest run on one worker thread (and hold a lock anyway).
    """

    def __init__(
        self,
        models: Sequence[str] = (),
        device: str | None = None,
        *,
        builtin: bool = True,
        threads: int | None = None,
    ) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.device: str = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._specs: dict[str, ModelSpec] = {}
        for spec in ([BUILTIN_NAME] if builtin else []) + list(models):
            try:
                resolved = resolve_model(spec)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            self._specs[resolved.name] = resolved
        self._bases: dict[str, Base] = {}
        self._runs: dict[str, Run] = {}
        self._full_samplers: OrderedDict[str, Base] = OrderedDict()  # full.sampler_model's LRU
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------------- metadata

    def supported_models(self) -> list[types.SupportedModel]:
        return [
            types.SupportedModel(model_name=s.name, max_context_length=s.max_context)
            for s in self._specs.values()
        ]

    def has_model(self, base_model: str) -> bool:
        return base_model in self._specs

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def spec(self, base_model: str) -> ModelSpec:
        spec = self._specs.get(base_model)
        if spec is None:
            raise _bad(f"base_model {base_model!r} is not served here; available: {', '.join(self._specs)}")
        return spec

    def tokenizer_path(self, base_model: str) -> Path:
        """The folder ``AutoTokenizer.from_pretrained`` reads this base model's tokenizer from."""
        return self.spec(base_model).path

    def info(self, run_id: str) -> types.GetInfoResponse:
        run = self._run(run_id)
        spec = run.base.loaded.spec
        return types.GetInfoResponse(
            type="get_info",
            model_data=types.ModelData(arch=spec.arch, model_name=spec.name),
            model_id=run_id,
            is_lora=run.adapter is not None,
            lora_rank=run.lora.rank if run.adapter is not None else None,
            model_name=spec.name,
        )

    def loaded_models(self) -> int:
        """The base-model copies in memory: the shared ones, the full-parameter runs' and samplers'."""
        with self._lock:
            own = sum(1 for r in self._runs.values() if r.adapter is None and not r.frozen)
            return len(self._bases) + own + len(self._full_samplers)

    # ------------------------------------------------------------------------------------------- validation

    def validate_batch(
        self,
        run_id: str,
        data: Sequence[types.Datum],
        loss_fn: str,
        config: Mapping[str, float] | None = None,
    ) -> Batch:
        """The batch checked and converted (BadRequestError naming the datum, the field and the fix)."""
        spec = self._run(run_id).base.loaded.spec
        return check_batch(
            data, loss_fn, vocab_size=spec.vocab_size, max_context=spec.max_context, config=config
        )

    def validate_sample(self, job: SampleJob) -> SampleJob:
        """The job checked, with its prompt ids (no model loading: cheap)."""
        spec = self.spec(job.base_model)
        checked = check_sample(job, vocab_size=spec.vocab_size, max_context=spec.max_context)
        if job.adapter_dir is not None:
            checkpoint.read_meta(Path(job.adapter_dir), job.base_model)
        return checked

    def validate_save(self, run_id: str, *, merged: bool) -> None:
        """A merged save's adapter targets no tied weight (``full.check_mergeable``)."""
        run = self._run(run_id)
        if merged and run.adapter is not None:
            full.check_mergeable(run)

    # ----------------------------------------------------------------------------------------------- models

    def _base(self, name: str) -> Base:
        base = self._bases.get(name)
        if base is None:
            base = self._bases[name] = Base.load(self.spec(name), self.device)
        return base

    def _run(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"model {run_id!r} is not loaded on this server", code="not_found")
        return run

    def create_run(
        self, run_id: str, base_model: str, lora: types.LoraConfig, *, frozen: bool = False
    ) -> None:
        """Add a run on ``base_model``, which starts as the base model: a LoRA adapter (B = 0), a copy of
        the model (``lora`` rank 0: full-parameter) or, ``frozen``, the shared base model (forward only)."""
        with self._lock:
            if run_id in self._runs:
                raise _bad(f"model {run_id!r} already exists")
            spec = self.spec(base_model)
            lora = FULL_PARAM if frozen else check_lora(lora)
            if frozen or lora.rank == 0:
                self._runs[run_id] = (
                    Run(run_id, self._base(base_model), None, lora, (), [], frozen=True)
                    if frozen
                    else full.new_run(run_id, spec, self.device)
                )
                return
            modules = targets(lora)
            base = self._base(base_model)
            seed = lora.seed if lora.seed is not None else secrets.randbits(63)
            try:
                name = inject(base, "run", lora.rank, modules, seed)
            except ValueError as exc:
                raise _bad(
                    f"cannot put LoRA on {base_model!r} (targets {', '.join(modules)}): {exc}"
                ) from None
            params = adapter_params(base.module, name)
            self._runs[run_id] = Run(
                run_id=run_id, base=base, adapter=name, lora=lora, targets=modules, params=params
            )

    def unload(self, run_id: str) -> None:
        """Drop the run's adapter, gradients and optimizer (checkpoints on disk are not touched)."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None and run.adapter is not None:
                delete_adapter(run.base, run.adapter)

    def close(self) -> None:
        """Release every model (the engine can be used again: models load on next use)."""
        with self._lock:
            self._runs.clear()
            self._bases.clear()
            self._full_samplers.clear()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------------- training

    def forward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str, *, reference: bool = False
    ) -> types.ForwardBackwardOutput:
        """Logprobs and losses of ``data`` without touching gradients; ``reference``: those of the run's base
        model, without what the run trained (the shared base with every adapter off: no copy)."""
        return self._pass(run_id, data, loss_fn, backward=False, reference=reference)

    def forward_backward(
        self, run_id: str, data: Sequence[types.Datum] | Batch, loss_fn: str
    ) -> types.ForwardBackwardOutput:
        """Like ``forward``, and the gradient of the summed loss is added to the adapter's ``.grad``."""
        return self._pass(run_id, data, loss_fn, backward=True)

    def _pass(
        self,
        run_id: str,
        data: Sequence[types.Datum] | Batch,
        loss_fn: str,
        *,
        backward: bool,
        reference: bool = False,
    ) -> types.ForwardBackwardOutput:
        with self._lock:
            run = self._trainable(run_id, "forward_backward") if backward else self._run(run_id)
            batch = data if isinstance(data, Batch) else self.validate_batch(run_id, data, loss_fn)
            shared = self._base(run.base.loaded.spec.name) if reference or run.frozen else None
            return training.forward_pass(run, batch, backward=backward, model=shared)

    def _trainable(self, run_id: str, what: str) -> Run:
        run = self._run(run_id)
        if run.frozen:
            raise _bad(f"model {run_id!r} is a forward-only reference model: it has no weights to {what}")
        return run

    def optim_step(self, run_id: str, adam: types.AdamParams | AdamStep) -> types.OptimStepResponse:
        """One AdamW step on the accumulated gradients (missing gradients count as zero), then clear them."""
        with self._lock:
            run = self._trainable(run_id, "optim_step")
            return training.optim_step(run, check_adam(adam))

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(
        self, run_id: str, directory: str | Path, *, optimizer: bool = True, merged: bool = False
    ) -> None:
        """Write the run's weights (its adapter, or every weight), and with ``optimizer`` its AdamW state,
        into ``directory``; ``merged``: a LoRA run's adapter merged into a copy of the base weights, written
        as a full-parameter checkpoint (``full.merged_weights``; sampler weights: no optimizer state)."""
        import torch

        with self._lock:
            run = self._trainable(run_id, "save")
            merge = merged and run.adapter is not None
            if merge:
                weights = full.merged_weights(run)
            else:
                weights = {key: p.detach().to("cpu", torch.float32).contiguous() for key, p in run.params}
            spec = run.base.loaded.spec
            checkpoint.write_checkpoint(
                Path(directory),
                base_model=spec.name,
                arch=spec.arch,
                lora=run.lora if run.adapter is not None and not merge else None,
                targets=() if merge else run.targets,
                steps=run.steps,
                weights=weights,
                optimizer=training.adam_moments(run) if optimizer and not merge else None,
                config=spec.path / "config.json",
            )

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        """Load a checkpoint written by ``save``; everything is checked before anything changes.

        The base model, rank and target modules must match the model. Pending gradients are dropped and
        ``step:max`` is restored. With ``optimizer`` the AdamW state is restored exactly (training resumes on
        the same trajectory; a checkpoint without optimizer state is an error), otherwise it starts fresh.
        """
        with self._lock:
            run = self._trainable(run_id, "load")
            directory = Path(directory)
            meta, weights = checkpoint.read_checkpoint(directory)
            self._check_compatible(run, meta)
            checkpoint.check_layout("checkpoint weights", weights, run.shapes)
            checkpoint.check_finite("checkpoint weights", weights)
            moments: dict[str, Any] = {}
            opt_step = 0
            if optimizer:
                moments, opt_step = checkpoint.read_optimizer(directory, meta, run.shapes)
            _apply(run, weights, moments, opt_step)
            run.steps = int(meta.get("steps") or 0)
            run.loss_sum = run.weight_sum = 0.0
            run.loss_tokens = run.loss_sequences = 0

    @staticmethod
    def _check_compatible(run: Run, meta: dict[str, Any]) -> None:
        spec = run.base.loaded.spec
        if meta.get("base_model") != spec.name:
            raise _bad(
                f"the checkpoint is for base model {meta.get('base_model')!r}, but model {run.run_id!r} uses "
                f"{spec.name!r}; load it into a model created on {meta.get('base_model')!r}"
            )
        lora = meta.get("lora") or {}
        if meta.get("format") == checkpoint.FULL_FORMAT:
            check_lora_match(run.lora, FULL_PARAM, "the checkpoint")
            return
        try:
            saved = types.LoraConfig(
                rank=lora["rank"],
                train_attn=lora["train_attn"],
                train_mlp=lora["train_mlp"],
                train_unembed=lora["train_unembed"],
            )
        except (KeyError, TypeError):
            raise _bad(
                f"the checkpoint's {checkpoint.ENGINE_FILE} has no LoRA config; it is damaged"
            ) from None
        check_lora_match(run.lora, saved, "the checkpoint")

    # ----------------------------------------------------------------------------------------------- sampling

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        """One response per job, in order. Jobs that share a base model and an adapter run as one batch."""
        with self._lock:
            groups: dict[tuple[str, str | None], list[SampleJob]] = {}
            order: dict[tuple[str, str | None], list[int]] = {}
            for i, job in enumerate(jobs):
                if job.prompt_ids is None:  # not checked by the server yet
                    job = self.validate_sample(job)
                key = (job.base_model, str(job.adapter_dir) if job.adapter_dir is not None else None)
                groups.setdefault(key, []).append(job)
                order.setdefault(key, []).append(i)
            results: dict[int, types.SampleResponse] = {}
            for key, group in groups.items():
                results.update(zip(order[key], self._sample_group(group), strict=True))
            return [results[i] for i in range(len(jobs))]

    def _sample_group(self, jobs: list[SampleJob]) -> list[types.SampleResponse]:
        adapter_dir = jobs[0].adapter_dir
        if adapter_dir is not None and checkpoint.weights_type(Path(adapter_dir)) == "base":
            spec = self.spec(jobs[0].base_model)
            model = full.sampler_model(self._full_samplers, spec, self.device, Path(adapter_dir))
            return sampling.sample_group(model, jobs, lambda: self._tokenizer(model))
        base = self._base(jobs[0].base_model)
        adapter = sampler_adapter(base, Path(adapter_dir)) if adapter_dir is not None else None
        base.activate((adapter,) if adapter else (), train=False)
        return sampling.sample_group(base, jobs, lambda: self._tokenizer(base))

    def _tokenizer(self, base: Base) -> Any:
        if base.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with quiet():
                    base.tokenizer = AutoTokenizer.from_pretrained(
                        str(base.loaded.spec.path), local_files_only=True
                    )
            except Exception as exc:
                raise _bad(
                    f"stop strings need the tokenizer of {base.loaded.spec.name!r}, which cannot be loaded "
                    f"({exc}); pass stop token ids instead"
                ) from None
        return base.tokenizer


def _apply(run: Run, weights: dict[str, Any], moments: dict[str, Any], opt_step: int) -> None:
    """Put checked checkpoint tensors into the run: weights, and a fresh AdamW holding ``moments``."""
    import torch

    with torch.no_grad():
        for key, p in run.params:
            p.copy_(weights[key].to(p.device, p.dtype))
            p.grad = None
    run.optimizer = None
    if moments:
        run.optimizer = training.new_optimizer([p for _, p in run.params])
        for key, p in run.params:
            run.optimizer.state[p] = {
                "step": torch.tensor(float(opt_step), dtype=torch.float32),
                "exp_avg": moments[f"{key}.exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": moments[f"{key}.exp_avg_sq"].to(p.device, p.dtype).clone(),
            }


if TYPE_CHECKING:
    _conforms: EngineAPI = Engine()  # mypy checks that Engine has the engine interface
