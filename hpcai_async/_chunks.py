"""Pure functions of the training client: checking and chunking a batch, combining results, custom losses.

``check_data`` holds what the client can check before it takes a sequence number; ``chunk_data`` splits a
batch into requests of at most 128 datums and 500 000 numbers (the official client's limits, PROTOCOL.md
§8.1); ``combine_outputs`` / ``combine_metrics`` merge the chunks' results back into one (§8.2);
``linearize`` turns a custom loss into cross-entropy weights (§8.3). No I/O: they are tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ._errors import APIError, ConfigurationError
from ._wire import shorten as _shorten
from .types import Datum, ForwardBackwardOutput, TensorData

if TYPE_CHECKING:
    import torch

__all__ = (
    "MAX_CHUNK_LEN",
    "MAX_CHUNK_NUMBER_COUNT",
    "CustomLossFn",
    "check_data",
    "chunk_data",
    "combine_metrics",
    "combine_outputs",
    "custom_count",
    "linearize",
)

# Chunking of forward / forward_backward, the official client's constants (PROTOCOL.md §8.1).
MAX_CHUNK_LEN = 128  # datums per request
MAX_CHUNK_NUMBER_COUNT = 500_000  # numbers (tokens + tensor values) per request

CustomLossFn: TypeAlias = Callable[
    [list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", Mapping[str, float]]
]


def chunk_data(data: Sequence[Datum], count: Callable[[Datum], int] | None = None) -> list[list[Datum]]:
    """Split ``data`` into requests of at most 128 datums and 500 000 numbers (a bigger datum goes alone)."""
    count = count or _num_numbers
    chunks: list[list[Datum]] = []
    current: list[Datum] = []
    numbers = 0
    for datum in data:
        n = count(datum)
        if current and (numbers + n > MAX_CHUNK_NUMBER_COUNT or len(current) == MAX_CHUNK_LEN):
            chunks.append(current)
            current, numbers = [], 0
        current.append(datum)
        numbers += n
    if current:
        chunks.append(current)
    return chunks


_TOKEN_MAX = 2**63 - 1  # token ids travel as int64 (PROTOCOL.md §5)


def check_data(data: Sequence[Datum], where: str = "data") -> None:
    """The rules the client can check before it reserves a sequence number (the server's, written for it).

    A token id that is not a non-negative 64-bit integer is a ``ConfigurationError`` naming the datum and
    chunk (it could not even be encoded). An empty batch is no error: it makes no chunks, so nothing is sent
    and the result is the empty output, as with the official client (the cookbook's RL loops send one when
    every advantage is zero); the server refuses an empty request body, which no client sends.
    Lists are checked with ``min``/``max`` (C speed); arrays and raw bytes are int64 by construction.
    """
    for i, datum in enumerate(data):
        for j, chunk in enumerate(datum.model_input.chunks):
            tokens = getattr(chunk, "tokens", None)
            if not isinstance(tokens, list) or not tokens:
                continue
            try:
                low, high = min(tokens), max(tokens)
                ok = low >= 0 and high <= _TOKEN_MAX
            except TypeError:
                ok = False
            if not ok:
                bad = next(
                    (t for t in tokens if not isinstance(t, int) or not 0 <= t <= _TOKEN_MAX), tokens[0]
                )
                raise ConfigurationError(
                    f"{where}[{i}].model_input.chunks[{j}].tokens: token ids are integers in [0, 2**63), got "
                    f"{_shorten(bad)}; nothing was sent"
                )


def _num_numbers(datum: Datum) -> int:
    return datum.num_numbers


def custom_count(datum: Datum) -> int:
    # forward_backward_custom sends each datum twice: as given, then with target_tokens and weights only.
    # Chunk by the larger of the two so both passes can use the same chunks (and the ids reserved for them).
    target = datum.loss_fn_inputs.get("target_tokens")
    second = datum.model_input.length + 2 * (target.size if target is not None else datum.model_input.length)
    return max(datum.num_numbers, second)


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    if total <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def combine_metrics(metrics: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Combine the metrics of chunk results (PROTOCOL.md §8.2).

    Only keys of the first chunk that every chunk has are kept; each is reduced by the suffix after its ``:``:
    ``mean`` (weighted by ``weights``, the datums per chunk), ``sum``, ``min``, ``max``, ``slack`` (max minus
    the weighted mean), ``unique`` (the first value under the key, later ones as ``key_1``, ``key_2`` ...) and
    ``hash_unordered``. Unknown reductions are dropped; keys without exactly one ``:`` keep the first chunk's
    value.
    """
    if not metrics:
        return {}
    first = metrics[0]
    out: dict[str, float] = {}
    for key, value in first.items():
        if not all(key in m for m in metrics[1:]):
            continue
        if key.count(":") != 1:
            out[key] = value
            continue
        values = [m[key] for m in metrics]
        match key.split(":")[1]:
            case "mean":
                out[key] = _weighted_mean(values, weights)
            case "sum":
                out[key] = float(sum(values))
            case "min":
                out[key] = min(values)
            case "max":
                out[key] = max(values)
            case "slack":
                out[key] = max(values) - _weighted_mean(values, weights)
            case "unique":
                out[key] = values[0]
                out.update({f"{key}_{i}": v for i, v in enumerate(values[1:], start=1)})
            case "hash_unordered":
                # the official client's order-insensitive hash of the (integer) per-chunk hashes
                out[key] = hash(tuple(sorted(int(v) for v in values)))
    return out


def combine_outputs(results: Sequence[ForwardBackwardOutput]) -> ForwardBackwardOutput:
    """One ForwardBackwardOutput from the results of the chunks of one call, in chunk order."""
    if not results:
        return ForwardBackwardOutput(loss_fn_output_type="", loss_fn_outputs=[], metrics={})
    return ForwardBackwardOutput(
        loss_fn_output_type=results[0].loss_fn_output_type,
        loss_fn_outputs=[out for r in results for out in r.loss_fn_outputs],
        metrics=combine_metrics([r.metrics for r in results], [len(r.loss_fn_outputs) for r in results]),
    )


def linearize(
    data: list[Datum], forward: ForwardBackwardOutput, loss_fn: CustomLossFn
) -> tuple[list[Datum], dict[str, float]]:
    """Turn a custom loss into cross-entropy weights: ``w = -d loss / d logprobs`` (PROTOCOL.md §8.3)."""
    import torch

    if len(forward.loss_fn_outputs) != len(data):
        raise APIError(
            f"the forward pass returned {len(forward.loss_fn_outputs)} outputs for {len(data)} datums"
        )
    logprobs = [
        torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
        for out in forward.loss_fn_outputs
    ]
    loss, metrics = loss_fn(data, logprobs)
    loss.backward()
    linear = []
    for datum, lp in zip(data, logprobs, strict=True):
        if "target_tokens" not in datum.loss_fn_inputs:
            raise ConfigurationError(
                "forward_backward_custom needs loss_fn_inputs['target_tokens'] in every datum"
            )
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)  # a datum the loss does not use
        weights = TensorData.from_numpy((-grad).detach().numpy().astype("float32"))
        linear.append(
            Datum(
                model_input=datum.model_input,
                loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"], "weights": weights},
            )
        )
    return linear, {key: float(_detached(value)) for key, value in metrics.items()}


def _detached(value: Any) -> Any:
    detach = getattr(value, "detach", None)  # a torch tensor metric: no autograd warning on float()
    return detach() if callable(detach) else value
