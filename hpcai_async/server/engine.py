"""The PyTorch LoRA engine: forward/backward, AdamW, checkpoints and batched sampling on shared base models.

One frozen base model is loaded per base name (lazily, on first use) and shared by every run on it. Each run
owns one PEFT LoRA adapter injected into that model (``peft.functional``: inject / set_adapter /
delete_adapter) and its own ``torch.optim.AdamW``. Sampling loads saved adapters under separate names (a small
LRU), so it never touches a training adapter's weights, gradients or optimizer.

Conventions (what the numbers mean):

- LoRA: ``lora_alpha = rank`` (scale 1), no dropout, A Kaiming-uniform (PEFT's default) and B zero, so a new
  run computes exactly the base model. ``train_attn`` targets q/k/v/o_proj, ``train_mlp`` gate/up/down_proj,
  ``train_unembed`` lm_head. ``seed`` makes the initial A reproducible (torch.manual_seed under fork_rng).
- Losses (sum-reduced over tokens and datums, PROTOCOL.md §5.3), per token with lp = log p(target):
  cross_entropy ``-w·lp``; importance_sampling ``-exp(lp - q)·A``; ppo ``-min(r·A, clip(r, 0.8, 1.2)·A)`` with
  r = exp(lp - q). ``elementwise_loss`` is that per-token term. ``loss:mean`` = Σ elementwise / Σ weights
  (cross_entropy) or / number of tokens (the others); 0.0 when the denominator is 0.
- optim_step: parameters without a gradient (no forward_backward since the last step) count as zero gradients,
  so every call is one AdamW step and ``step:max`` counts calls. ``grad_clip_norm > 0`` clips the global norm.
  ``recent_loss:mean`` is the loss:mean over the forward_backward calls since the previous step.
- Checkpoints (a folder): ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout, loadable
  with ``PeftModel.from_pretrained``), ``engine.json`` (base model, LoRA config, steps), and for training
  checkpoints ``optimizer.safetensors`` (``<param>.exp_avg`` / ``<param>.exp_avg_sq``; the step is in
  engine.json). Loading restores ``step:max``; with ``optimizer=False`` the AdamW state starts fresh.
- Sampling: ``temperature`` 0 is greedy; ``top_k`` -1 is off; ``max_tokens`` None means 256 tokens
  (``DEFAULT_MAX_TOKENS``) or up to the context end if that comes first (stop_reason "length"); prompt +
  max_tokens beyond the context is rejected; at most 256 samples per request. ``stop``:
  None stops at EOS; a list of strings stops when the decoded completion contains one of them (EOS also
  stops); a list of token ids stops at those ids only; ``[]`` disables every stop. The token that completes a
  stop (string or id, EOS too) is the last token returned. Sampled logprobs are log-softmax at temperature 1
  of the raw logits. With a seed, sample i of a job draws from its own generator seeded by (seed, i), so its
  tokens do not depend on the other jobs in the batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import json
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from msgspec import UnsetType

from .. import types
from .._errors import BadRequestError, ConfigurationError, NotFoundError
from .engine_api import LOSS_FN_INPUTS, SampleJob, check_batch, check_sample
from .models import BUILTIN_NAME, LoadedModel, ModelSpec, load_model, quiet, resolve_model

__all__ = ("DEFAULT_MAX_TOKENS", "MAX_NUM_SAMPLES", "Engine")

PPO_CLIP: Final = (0.8, 1.2)  # absolute ratio bounds, the tinker defaults (hpcai has no loss_fn_config)

ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: Final = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES: Final = ("lm_head",)

DEFAULT_MAX_TOKENS: Final = 256  # max_tokens=None: a bounded default rather than "until the context ends"
MAX_NUM_SAMPLES: Final = 256
SAMPLER_CACHE_SIZE: Final = 4  # saved adapters kept loaded for sampling
CHECKPOINT_FORMAT: Final = "hpcai-async-lora/1"
ADAPTER_FILE: Final = "adapter_model.safetensors"
OPTIMIZER_FILE: Final = "optimizer.safetensors"
ENGINE_FILE: Final = "engine.json"
_PEFT_PREFIX: Final = "base_model.model."  # key prefix PeftModel.save_pretrained uses


@dataclass(slots=True)
class _Base:
    """A loaded base model and the adapters injected into it."""

    loaded: LoadedModel
    active: tuple[str, ...] | None = None  # adapters active now (None: unknown, set again before use)
    counter: int = 0
    samplers: OrderedDict[str, str] = field(default_factory=OrderedDict)  # LRU
    tokenizer: Any = None
    keep_logits: bool = False  # the model's forward takes logits_to_keep
    cache_arg: str = "past_key_values"  # the KV-cache argument ("cache" from transformers 5.x)

    @property
    def module(self) -> Any:
        return self.loaded.module

    def new_adapter_name(self, prefix: str) -> str:
        # internal names: PEFT forbids names that are substrings of "lora_" and dots (ModuleDict keys)
        self.counter += 1
        return f"{prefix}{self.counter}"


@dataclass(slots=True)
class _Run:
    run_id: str
    base: _Base
    adapter: str
    lora: types.LoraConfig
    targets: tuple[str, ...]
    params: list[tuple[str, Any]]  # (checkpoint key, Parameter), in a fixed order
    optimizer: Any = None  # torch.optim.AdamW, created by the first optim_step
    steps: int = 0
    loss_sum: float = 0.0  # since the last optim_step, for recent_loss:mean
    weight_sum: float = 0.0


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_request")


def _targets(lora: types.LoraConfig) -> tuple[str, ...]:
    out: tuple[str, ...] = ()
    if lora.train_attn:
        out += ATTN_MODULES
    if lora.train_mlp:
        out += MLP_MODULES
    if lora.train_unembed:
        out += UNEMBED_MODULES
    return out


class Engine:
    """LoRA training and sampling on local base models; implements ``engine_api.EngineAPI``.

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
        self._bases: dict[str, _Base] = {}
        self._runs: dict[str, _Run] = {}
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
            is_lora=True,
            lora_rank=run.lora.rank,
            model_name=spec.name,
        )

    # ------------------------------------------------------------------------------------------- validation

    def validate_batch(self, run_id: str, data: Sequence[types.Datum], loss_fn: str) -> None:
        """BadRequestError naming the datum, the field and the fix, for anything forward would reject."""
        _batch_arrays(data, loss_fn, self._run(run_id).base.loaded.spec)

    def validate_sample(self, job: SampleJob) -> None:
        """BadRequestError for a sample job the engine would reject (no model loading: cheap)."""
        _check_sample(job, self.spec(job.base_model))
        if job.adapter_dir is not None:
            _read_meta(Path(job.adapter_dir), job.base_model)

    # ----------------------------------------------------------------------------------------------- models

    def _base(self, name: str) -> _Base:
        base = self._bases.get(name)
        if base is None:
            import inspect

            loaded = load_model(self.spec(name), self.device)
            args = inspect.signature(loaded.module.forward).parameters
            base = self._bases[name] = _Base(
                loaded=loaded,
                keep_logits="logits_to_keep" in args,
                cache_arg="cache" if "cache" in args else "past_key_values",
            )
        return base

    def _activate(self, base: _Base, adapters: tuple[str, ...], *, train: bool) -> None:
        if base.active == adapters:
            return
        from peft import functional as peft_fn

        with quiet():
            peft_fn.set_adapter(base.module, list(adapters), inference_mode=not train)
        base.active = adapters

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"model {run_id!r} is not loaded on this server", code="not_found")
        return run

    def create_run(self, run_id: str, base_model: str, lora: types.LoraConfig) -> None:
        """Add a LoRA adapter for ``run_id`` on ``base_model`` (B = 0: it starts as the base model)."""
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft import functional as peft_fn

        with self._lock:
            if run_id in self._runs:
                raise _bad(f"model {run_id!r} already exists")
            self.spec(base_model)
            if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
                raise _bad(f"lora_config.rank must be a positive integer, got {lora.rank!r}")
            targets = _targets(lora)
            if not targets:
                raise _bad("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
            base = self._base(base_model)
            name = base.new_adapter_name("run")
            config = PeftLoraConfig(
                r=lora.rank, lora_alpha=lora.rank, lora_dropout=0.0, target_modules=list(targets), bias="none"
            )
            seed = lora.seed if lora.seed is not None else secrets.randbits(63)
            try:
                with torch.random.fork_rng(devices=[]), quiet():
                    torch.manual_seed(seed)
                    peft_fn.inject_adapter_in_model(config, base.module, adapter_name=name)
            except ValueError as exc:
                raise _bad(
                    f"cannot put LoRA on {base_model!r} (targets {', '.join(targets)}): {exc}"
                ) from None
            finally:
                base.active = None
            params = _adapter_params(base.module, name)
            self._runs[run_id] = _Run(
                run_id=run_id, base=base, adapter=name, lora=lora, targets=targets, params=params
            )

    def unload(self, run_id: str) -> None:
        """Drop the run's adapter, gradients and optimizer (checkpoints on disk are not touched)."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None:
                _delete_adapter(run.base, run.adapter)

    def close(self) -> None:
        """Release every model (the engine can be used again: models load on next use)."""
        with self._lock:
            self._runs.clear()
            self._bases.clear()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------------- training

    def forward(self, run_id: str, data: list[types.Datum], loss_fn: str) -> types.ForwardBackwardOutput:
        """Logprobs and losses of ``data`` without touching gradients."""
        return self._pass(run_id, data, loss_fn, backward=False)

    def forward_backward(
        self, run_id: str, data: list[types.Datum], loss_fn: str
    ) -> types.ForwardBackwardOutput:
        """Like ``forward``, and the gradient of the summed loss is added to the adapter's ``.grad``."""
        return self._pass(run_id, data, loss_fn, backward=True)

    def _pass(
        self, run_id: str, data: list[types.Datum], loss_fn: str, *, backward: bool
    ) -> types.ForwardBackwardOutput:
        import torch

        with self._lock:
            run = self._run(run_id)
            base = run.base
            arrays = _batch_arrays(data, loss_fn, base.loaded.spec)
            self._activate(base, (run.adapter,), train=True)
            batch = _pad_batch(arrays, base.loaded.pad_token_id, base.loaded.device)
            with torch.enable_grad() if backward else torch.inference_mode():
                logits = base.module(
                    input_ids=batch["input_ids"], attention_mask=batch["mask"], use_cache=False
                ).logits
                lp = _target_logprobs(logits, batch["target_tokens"])
                del logits
                elementwise, denom = _loss_terms(loss_fn, lp, batch)
                total = elementwise.sum()
                if backward:
                    total.backward()
            loss_sum = float(total.detach())
            if backward:
                run.loss_sum += loss_sum
                run.weight_sum += denom
            lp_np = lp.detach().to("cpu", torch.float32).numpy()
            el_np = elementwise.detach().to("cpu", torch.float32).numpy()
            outputs = []
            for i, tokens in enumerate(arrays["input_ids"]):
                n = len(tokens)
                outputs.append(
                    {
                        "logprobs": types.TensorData(data=lp_np[i, :n], dtype="float32", shape=[n]),
                        "elementwise_loss": types.TensorData(data=el_np[i, :n], dtype="float32", shape=[n]),
                    }
                )
            return types.ForwardBackwardOutput(
                loss_fn_output_type=loss_fn,
                loss_fn_outputs=outputs,
                metrics={
                    "loss:mean": loss_sum / denom if denom else 0.0,
                    "num_examples:sum": float(len(data)),
                    "step:max": float(run.steps),
                },
            )

    def optim_step(self, run_id: str, adam: types.AdamParams) -> types.OptimStepResponse:
        """One AdamW step on the accumulated gradients (missing gradients count as zero), then clear them."""
        import torch

        with self._lock:
            run = self._run(run_id)
            lr, betas, eps, weight_decay, clip = _check_adam(adam)
            params = [p for _, p in run.params]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if run.optimizer is None:
                run.optimizer = _new_optimizer(params)
            for group in run.optimizer.param_groups:
                group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            run.optimizer.step()
            for p in params:
                p.grad = None
            run.steps += 1
            recent = run.loss_sum / run.weight_sum if run.weight_sum else 0.0
            run.loss_sum = run.weight_sum = 0.0
            return types.OptimStepResponse(
                metrics={"step:max": float(run.steps), "learning_rate:mean": lr, "recent_loss:mean": recent}
            )

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, run_id: str, directory: str | Path, *, optimizer: bool = True) -> None:
        """Write the run's adapter, and with ``optimizer`` its AdamW state, into ``directory``."""
        import torch
        from safetensors.torch import save_file

        with self._lock:
            run = self._run(run_id)
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            weights = {key: p.detach().to("cpu", torch.float32).contiguous() for key, p in run.params}
            save_file(weights, str(out / ADAPTER_FILE), metadata={"format": "pt"})
            opt_meta: dict[str, Any] | None = None
            if optimizer:
                state = run.optimizer.state if run.optimizer is not None else {}
                tensors: dict[str, Any] = {}
                opt_step = 0
                for key, p in run.params:
                    s = state.get(p)
                    if s:
                        tensors[f"{key}.exp_avg"] = s["exp_avg"].detach().to("cpu").contiguous()
                        tensors[f"{key}.exp_avg_sq"] = s["exp_avg_sq"].detach().to("cpu").contiguous()
                        opt_step = int(s["step"])
                save_file(tensors, str(out / OPTIMIZER_FILE), metadata={"format": "pt"})
                opt_meta = {"type": "adamw", "step": opt_step}
            spec = run.base.loaded.spec
            meta = {
                "format": CHECKPOINT_FORMAT,
                "base_model": spec.name,
                "arch": spec.arch,
                "lora": {
                    "rank": run.lora.rank,
                    "alpha": run.lora.rank,
                    "seed": run.lora.seed,
                    "train_attn": run.lora.train_attn,
                    "train_mlp": run.lora.train_mlp,
                    "train_unembed": run.lora.train_unembed,
                },
                "target_modules": list(run.targets),
                "steps": run.steps,
                "optimizer": opt_meta,
            }
            (out / ENGINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (out / "adapter_config.json").write_text(
                json.dumps(_peft_config_json(spec, run), indent=2) + "\n"
            )

    def load(self, run_id: str, directory: str | Path, *, optimizer: bool = False) -> None:
        """Load a checkpoint written by ``save``; everything is checked before anything changes.

        The base model, rank and target modules must match the model. Pending gradients are dropped and
        ``step:max`` is restored. With ``optimizer`` the AdamW state is restored exactly (training resumes on
        the same trajectory; a checkpoint without optimizer state is an error), otherwise it starts fresh.
        """
        import torch

        with self._lock:
            run = self._run(run_id)
            directory = Path(directory)
            meta, weights = _read_checkpoint(directory)
            spec = run.base.loaded.spec
            if meta.get("base_model") != spec.name:
                raise _bad(
                    f"the checkpoint is for base model {meta.get('base_model')!r}, but model {run_id!r} uses "
                    f"{spec.name!r}; load it into a model created on {meta.get('base_model')!r}"
                )
            lora = meta.get("lora") or {}
            if lora.get("rank") != run.lora.rank or tuple(meta.get("target_modules") or ()) != run.targets:
                raise _bad(
                    f"the checkpoint has LoRA rank {lora.get('rank')} on {meta.get('target_modules')}, "
                    f"but model {run_id!r} has rank {run.lora.rank} on {list(run.targets)}; create the model "
                    "with the checkpoint's lora_config"
                )
            _check_tensors("checkpoint weights", weights, {k: tuple(p.shape) for k, p in run.params})
            opt_tensors: dict[str, Any] = {}
            opt_step = 0
            if optimizer:
                opt_meta = meta.get("optimizer")
                path = directory / OPTIMIZER_FILE
                if not isinstance(opt_meta, dict) or not path.is_file():
                    raise _bad(
                        "this checkpoint holds no optimizer state (a sampler checkpoint?); load it without "
                        "the optimizer, or save with save_state to keep the optimizer"
                    )
                opt_tensors = _load_safetensors(path)
                opt_step = int(opt_meta.get("step") or 0)
                if opt_tensors:  # empty when saved before the first optim_step
                    expected = {}
                    for key, p in run.params:
                        expected[f"{key}.exp_avg"] = tuple(p.shape)
                        expected[f"{key}.exp_avg_sq"] = tuple(p.shape)
                    _check_tensors("checkpoint optimizer state", opt_tensors, expected)
                    if opt_step < 1:
                        raise _bad("the checkpoint's optimizer state has no step count; it is damaged")
            # every check passed: apply
            with torch.no_grad():
                for key, p in run.params:
                    p.copy_(weights[key].to(p.device, p.dtype))
                    p.grad = None
            run.optimizer = None
            if opt_tensors:
                run.optimizer = _new_optimizer([p for _, p in run.params])
                for key, p in run.params:
                    run.optimizer.state[p] = {
                        "step": torch.tensor(float(opt_step), dtype=torch.float32),
                        "exp_avg": opt_tensors[f"{key}.exp_avg"].to(p.device, p.dtype).clone(),
                        "exp_avg_sq": opt_tensors[f"{key}.exp_avg_sq"].to(p.device, p.dtype).clone(),
                    }
            run.steps = int(meta.get("steps") or 0)
            run.loss_sum = run.weight_sum = 0.0

    # ----------------------------------------------------------------------------------------------- sampling

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        """One response per job, in order. Jobs that share a base model and an adapter run as one batch."""
        with self._lock:
            groups: dict[tuple[str, str | None], list[int]] = {}
            for i, job in enumerate(jobs):
                self.validate_sample(job)
                key = (job.base_model, str(job.adapter_dir) if job.adapter_dir is not None else None)
                groups.setdefault(key, []).append(i)
            results: dict[int, types.SampleResponse] = {}
            for (base_model, _), indices in groups.items():
                responses = self._sample_group(base_model, [jobs[i] for i in indices])
                results.update(zip(indices, responses, strict=True))
            return [results[i] for i in range(len(jobs))]

    def _tokenizer(self, base: _Base) -> Any:
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

    def _sampler_adapter(self, base: _Base, job: SampleJob) -> str:
        """The internal name of ``job``'s saved adapter, loaded if needed (an LRU of SAMPLER_CACHE_SIZE)."""
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft import functional as peft_fn

        assert job.adapter_dir is not None
        path = Path(job.adapter_dir)
        try:
            stat = (path / ADAPTER_FILE).stat()
        except OSError:
            raise _bad(f"{path} holds no {ADAPTER_FILE}: not a checkpoint of this server") from None
        key = f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"  # a new save under the same name reloads
        name = base.samplers.get(key)
        if name is not None:
            base.samplers.move_to_end(key)
            return name
        meta, weights = _read_checkpoint(path)
        if meta.get("base_model") != base.loaded.spec.name:
            raise _bad(
                f"the weights at {path.name!r} are for base model {meta.get('base_model')!r}, "
                f"not {base.loaded.spec.name!r}"
            )
        rank = int(meta["lora"]["rank"])
        config = PeftLoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=list(meta["target_modules"]),
            bias="none",
        )
        name = base.new_adapter_name("smp")
        try:
            with quiet():
                peft_fn.inject_adapter_in_model(config, base.module, adapter_name=name)
        finally:
            base.active = None
        params = _adapter_params(base.module, name)
        try:
            _check_tensors(f"weights at {path.name!r}", weights, {k: tuple(p.shape) for k, p in params})
        except BadRequestError:
            _delete_adapter(base, name)
            raise
        with torch.no_grad():
            for k, p in params:
                p.requires_grad_(False)
                p.copy_(weights[k].to(p.device, p.dtype))
        base.samplers[key] = name
        while len(base.samplers) > SAMPLER_CACHE_SIZE:
            _, old = base.samplers.popitem(last=False)
            _delete_adapter(base, old)
        return name

    def _sample_group(self, base_model: str, jobs: list[SampleJob]) -> list[types.SampleResponse]:
        import torch

        base = self._base(base_model)
        loaded = base.loaded
        spec = loaded.spec
        device = loaded.device
        adapter = self._sampler_adapter(base, jobs[0]) if jobs[0].adapter_dir is not None else None
        self._activate(base, (adapter,) if adapter else (), train=False)

        # one row per sample; the rows of a job are adjacent
        rows: list[_Row] = []
        for j, job in enumerate(jobs):
            prompt = job.prompt.to_numpy()
            p = job.params
            budget = spec.max_context - len(prompt)
            max_new = min(p.max_tokens if p.max_tokens is not None else DEFAULT_MAX_TOKENS, budget)
            stop_ids, stop_strs = _stops(p.stop, loaded.eos_token_ids)
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            for i in range(job.num_samples):
                row = _Row(job=j, prompt=prompt, max_new=max_new, stop_ids=stop_ids, stop_strs=stop_strs)
                row.uniforms = _uniforms(seed, i, max_new)
                rows.append(row)
        n_rows = len(rows)
        width = max(len(r.prompt) for r in rows)
        steps = max(r.max_new for r in rows)
        ids = np.full((n_rows, width), loaded.pad_token_id, dtype=np.int64)
        mask = np.zeros((n_rows, width), dtype=np.int64)
        uniforms = np.zeros((n_rows, steps), dtype=np.float64)
        for r, row in enumerate(rows):
            ids[r, width - len(row.prompt) :] = row.prompt
            mask[r, width - len(row.prompt) :] = 1
            uniforms[r, : row.max_new] = row.uniforms
        params = [jobs[r.job].params for r in rows]
        vocab = spec.vocab_size
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        u = torch.from_numpy(uniforms).to(device)
        want_prompt_lp = [job.prompt_logprobs for job in jobs]
        stop_text = _StopText(self._tokenizer(base)) if any(r.stop_strs for r in rows) else None

        input_ids = torch.from_numpy(ids).to(device)
        attn = torch.from_numpy(mask).to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if base.keep_logits and not any(want_prompt_lp):
            kwargs["logits_to_keep"] = 1
        prompt_lps: dict[int, list[float | None]] = {}
        with torch.inference_mode():
            out = base.module(
                input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True, **kwargs
            )
            cache = getattr(out, base.cache_arg)
            first_row: dict[int, int] = {}
            for r, row in enumerate(rows):
                first_row.setdefault(row.job, r)
            for j, wanted in enumerate(want_prompt_lp):
                if wanted:
                    r = first_row[j]
                    n = len(rows[r].prompt)
                    lp = _target_logprobs(out.logits[r, width - n : width - 1], input_ids[r, width - n + 1 :])
                    prompt_lps[j] = [None, *lp.cpu().tolist()]
            last = out.logits[:, -1, :].float()
            del out
            pos = positions[:, -1:]
            live = list(range(n_rows))
            for step in range(steps):
                chosen = _pick(last, temp, top_k, top_p, u[:, step])
                chosen_lp = torch.log_softmax(last, dim=-1).gather(1, chosen[:, None])[:, 0]
                toks = chosen.tolist()
                lps = chosen_lp.tolist()
                still = []
                for r in live:
                    row = rows[r]
                    t = toks[r]
                    row.tokens.append(t)
                    row.logprobs.append(lps[r])
                    if t in row.stop_ids or (stop_text is not None and row.stop_strs and stop_text.hit(row)):
                        row.reason = "stop"
                    elif len(row.tokens) >= row.max_new:
                        row.reason = "length"
                    else:
                        still.append(r)
                live = still
                if not live:
                    break
                attn = torch.cat([attn, attn.new_ones((n_rows, 1))], dim=1)
                pos = pos + 1
                out = base.module(
                    input_ids=chosen[:, None],
                    attention_mask=attn,
                    position_ids=pos,
                    use_cache=True,
                    **{base.cache_arg: cache},
                )
                cache = getattr(out, base.cache_arg)
                last = out.logits[:, -1, :].float()
                del out
        responses = []
        for j, job in enumerate(jobs):
            seqs = [
                types.SampledSequence(stop_reason=r.reason, tokens=r.tokens, logprobs=r.logprobs)
                for r in rows
                if r.job == j
            ]
            lp_list = prompt_lps.get(j) if job.prompt_logprobs else None
            responses.append(types.SampleResponse(sequences=seqs, prompt_logprobs=lp_list))
        return responses


# --------------------------------------------------------------------------------------------- helpers


@dataclass(slots=True)
class _Row:
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


def _adapter_params(module: Any, adapter: str) -> list[tuple[str, Any]]:
    """(PEFT checkpoint key, parameter) of one adapter, in module order."""
    marker = f".{adapter}."
    out = []
    for name, p in module.named_parameters():
        if marker in name and (".lora_A." in name or ".lora_B." in name):
            out.append((_PEFT_PREFIX + name.replace(marker, "."), p))
    return out


def _delete_adapter(base: _Base, name: str) -> None:
    from peft import functional as peft_fn

    with quiet():
        peft_fn.delete_adapter(base.module, name, prefix="lora_")
    configs = getattr(base.module, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(name, None)
    base.active = None


def _new_optimizer(params: list[Any]) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def _check_adam(adam: types.AdamParams) -> tuple[float, tuple[float, float], float, float, float]:
    wd = 0.0 if isinstance(adam.weight_decay, UnsetType) else float(adam.weight_decay)
    clip = 0.0 if isinstance(adam.grad_clip_norm, UnsetType) else float(adam.grad_clip_norm)
    lr, b1, b2, eps = float(adam.learning_rate), float(adam.beta1), float(adam.beta2), float(adam.eps)
    checks = [
        (math.isfinite(lr) and lr >= 0, f"learning_rate must be a finite number >= 0, got {lr}"),
        (0 <= b1 < 1, f"beta1 must be in [0, 1), got {b1}"),
        (0 <= b2 < 1, f"beta2 must be in [0, 1), got {b2}"),
        (math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps}"),
        (math.isfinite(wd) and wd >= 0, f"weight_decay must be a finite number >= 0, got {wd}"),
        (math.isfinite(clip) and clip >= 0, f"grad_clip_norm must be >= 0 (0 = no clipping), got {clip}"),
    ]
    for ok, message in checks:
        if not ok:
            raise _bad(f"adam_params: {message}")
    return lr, (b1, b2), eps, wd, clip


def _batch_arrays(
    data: Sequence[types.Datum], loss_fn: str, spec: ModelSpec
) -> dict[str, list[npt.NDArray[Any]]]:
    """Validate a batch and return its arrays per field (``input_ids`` and each loss input), one per datum.

    ``engine_api.check_batch`` does the checks; this engine adds one: float inputs must be float32.
    """
    try:
        check_batch(list(data), loss_fn, vocab_size=spec.vocab_size, max_context=spec.max_context)
    except BadRequestError:
        raise
    except ValueError as exc:  # undecodable tensor data
        raise _bad(str(exc)) from None
    required = LOSS_FN_INPUTS[loss_fn]
    arrays: dict[str, list[npt.NDArray[Any]]] = {"input_ids": [], **{k: [] for k in required}}
    for i, datum in enumerate(data):
        arrays["input_ids"].append(datum.model_input.to_numpy())
        for key, dtype in required.items():
            td = datum.loss_fn_inputs[key]
            if td.dtype != dtype:
                raise _bad(f"data[{i}].loss_fn_inputs[{key!r}] must have dtype {dtype}, got {td.dtype}")
            arrays[key].append(td.to_numpy().reshape(-1))
    return arrays


def _check_sample(job: SampleJob, spec: ModelSpec) -> None:
    """``engine_api.check_sample`` plus the limits it leaves out."""
    try:
        check_sample(job, vocab_size=spec.vocab_size, max_context=spec.max_context)
    except BadRequestError:
        raise
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if job.num_samples > MAX_NUM_SAMPLES:
        raise _bad(
            f"num_samples: at most {MAX_NUM_SAMPLES} per request, got {job.num_samples}; "
            "send several requests"
        )
    p = job.params
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k == 0 or p.top_k < -1:
        raise _bad(f"sampling_params.top_k: must be -1 (no limit) or a positive integer, got {p.top_k!r}")
    stop = p.stop
    if isinstance(stop, str):
        if not stop:
            raise _bad("sampling_params.stop: an empty stop string would stop at once")
    elif isinstance(stop, list):
        kinds = {
            str if isinstance(s, str) else int if isinstance(s, int) and not isinstance(s, bool) else None
            for s in stop
        }
        if None in kinds or len(kinds) > 1:
            raise _bad("sampling_params.stop: give a list of strings or a list of token ids, not a mix")
    elif stop is not None:
        raise _bad("sampling_params.stop: must be a string, a list of strings or a list of token ids")


def _pad_batch(arrays: dict[str, list[npt.NDArray[Any]]], pad_id: int, device: Any) -> dict[str, Any]:
    """Right-padded [B, T] tensors of every field plus the attention ``mask``."""
    import torch

    seqs = arrays["input_ids"]
    width = max(len(s) for s in seqs)
    out: dict[str, Any] = {}
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        mask[i, : len(s)] = 1
    out["mask"] = torch.from_numpy(mask).to(device)
    for key, values in arrays.items():
        dtype = np.int64 if key in ("input_ids", "target_tokens") else np.float32
        fill = pad_id if key == "input_ids" else 0
        arr = np.full((len(seqs), width), fill, dtype=dtype)
        for i, v in enumerate(values):
            arr[i, : len(v)] = v
        out[key] = torch.from_numpy(arr).to(device)
    return out


def _target_logprobs(logits: Any, targets: Any) -> Any:
    """log_softmax(logits)[target] per position in float32 (cross_entropy: no full log-softmax kept)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1]).float()
    lp = -torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none")
    return lp.view(targets.shape)


def _loss_terms(loss_fn: str, lp: Any, batch: dict[str, Any]) -> tuple[Any, float]:
    """Per-token loss terms [B, T] (zero on padding) and the loss:mean denominator."""
    import torch

    mask = batch["mask"].to(lp.dtype)
    if loss_fn == "cross_entropy":
        weights = batch["weights"]
        return -weights * lp * mask, float(weights.sum())
    ratio = torch.exp(lp - batch["logprobs"])
    adv = batch["advantages"]
    if loss_fn == "importance_sampling":
        term = ratio * adv
    else:
        low, high = PPO_CLIP
        term = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
    return torch.where(mask > 0, -term, torch.zeros_like(term)), float(mask.sum())


def _check_tensors(what: str, tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise _bad(f"{what} do not match the model's LoRA layout ({detail})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise _bad(f"{what}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)}")


def _read_meta(directory: Path, base_model: str | None = None) -> dict[str, Any]:
    path = directory / ENGINE_FILE
    if not path.is_file() or not (directory / ADAPTER_FILE).is_file():
        raise _bad(f"{directory} is not a checkpoint of this server (no {ENGINE_FILE} / {ADAPTER_FILE})")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(f"cannot read {path}: {exc}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise _bad(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if base_model is not None and meta.get("base_model") != base_model:
        raise _bad(
            f"weights at {directory} are for base model {meta.get('base_model')!r}, not {base_model!r}"
        )
    return meta


def _read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = _read_meta(directory)
    return meta, _load_safetensors(directory / ADAPTER_FILE)


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        tensors: dict[str, Any] = load_file(str(path))
    except Exception as exc:
        raise _bad(f"cannot read {path.name}: {exc}") from None
    return tensors


def _peft_config_json(spec: ModelSpec, run: _Run) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it, for ``PeftModel.from_pretrained(base, folder)``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.name,
        "r": run.lora.rank,
        "lora_alpha": run.lora.rank,
        "lora_dropout": 0.0,
        "target_modules": list(run.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
