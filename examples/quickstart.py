"""Quickstart: the HPC-AI TrainingClient walkthrough, in plain synchronous code.

    python -m examples.quickstart        # starts a local server with the built-in model
    HPCAI_BASE_URL=... HPCAI_API_KEY=... HPCAI_BASE_MODEL=Qwen/Qwen3-8B python -m examples.quickstart

Each call of the reference (forward, forward_backward, optim_step, get_info, get_tokenizer, save_state,
load_state, save_weights_for_sampler, sampling, list_checkpoints, unload_model) is made once and its result
printed. Training calls return an ``APIFuture`` at once; ``.result()`` waits for it. The only change from code
written for the official SDK is the import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from hpcai_async import ServiceClient, types

from . import _common


def run(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    base_model: str = _common.BASE_MODEL,
    rank: int = 8,
    show: bool = True,
) -> dict[str, Any]:
    """Walk through the API; returns every result by name."""
    results: dict[str, Any] = {}

    def step(name: str, value: Any) -> Any:
        results[name] = value
        if show:
            print(f"\n>>> {name}\n{value}")
        return value

    with ServiceClient(base_url=base_url, api_key=api_key) as service_client:
        training_client = service_client.create_lora_training_client(base_model, rank=rank)
        rest_client = service_client.create_rest_client()

        # The tokenizer of the run's base model (a Hugging Face tokenizer).
        tokenizer = training_client.get_tokenizer()
        step("get_tokenizer", tokenizer.encode("Hello, world!"))

        # One sentence: inputs are its tokens but the last, targets are the tokens shifted by one.
        tokens = tokenizer.encode("The small cat sat on the red mat.")
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(
                        data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]
                    ),
                    "weights": types.TensorData(
                        data=[1.0] * (len(tokens) - 1), dtype="float32", shape=[len(tokens) - 1]
                    ),
                },
            )
        ]

        step("forward", training_client.forward(data, loss_fn="cross_entropy").result())
        step("forward_backward", training_client.forward_backward(data, loss_fn="cross_entropy").result())
        adam = types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12)
        step("optim_step", training_client.optim_step(adam_params=adam).result())
        step("get_info", training_client.get_info())

        saved = step("save_state", training_client.save_state("initial").result())
        step("load_state", training_client.load_state(saved.path).result())
        sampler_weights = step(
            "save_weights_for_sampler", training_client.save_weights_for_sampler("initial").result()
        )

        # Sampling from the saved weights: three completions of a question in the pre-training format.
        sampling_client = service_client.create_sampling_client(
            model_path=sampler_weights.path, base_model=base_model
        )
        prompt = types.ModelInput.from_ints(tokenizer.encode(_common.qa_prompt("What color is the sky?")))
        params = types.SamplingParams(max_tokens=8, temperature=0.7, stop=["\n"], seed=0)
        response = step(
            "sample", sampling_client.sample(prompt=prompt, num_samples=3, sampling_params=params).result()
        )
        if show:
            for seq in response.sequences:
                print(f"  Q: What color is the sky?  A:{tokenizer.decode(seq.tokens)!r}")

        step("unload_model", training_client.unload_model().result())
        # Unloading ends the run; its checkpoints stay.
        step("list_checkpoints", rest_client.list_checkpoints(training_client.model_id).result())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-model", default=_common.BASE_MODEL)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    with _common.endpoint() as ep:
        run(ep.base_url, ep.api_key, base_model=args.base_model, rank=args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
