"""Client pieces that need no server: chunking, the chunk combiner, checkpoint paths, tokenizer names."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

import hpcai_async
from hpcai_async import types
from hpcai_async._retry import backoff_delay, retry_after
from hpcai_async._tokenizer import tokenizer_id
from hpcai_async.rest import parse_checkpoint_path
from hpcai_async.training import (
    MAX_CHUNK_LEN,
    MAX_CHUNK_NUMBER_COUNT,
    chunk_data,
    combine_metrics,
    combine_outputs,
)


def datum(n_tokens: int) -> types.Datum:
    """A datum putting 3 * n_tokens numbers on the wire (tokens, target_tokens, weights)."""
    tokens = np.arange(n_tokens + 1) % 100
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(n_tokens, np.float32)},
    )


# ----------------------------------------------------------------------------------------- public API


def test_all_is_sorted_complete_and_importable() -> None:
    assert list(hpcai_async.__all__) == sorted(hpcai_async.__all__)
    assert isinstance(hpcai_async.__all__, tuple)
    for name in hpcai_async.__all__:
        assert hasattr(hpcai_async, name), name
    # submodules become attributes once anything imports them (cli, compat, server, ...): not API names
    public = {
        n for n, v in vars(hpcai_async).items() if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    assert public <= set(hpcai_async.__all__), public - set(hpcai_async.__all__)
    assert hpcai_async.types is types


def test_every_operation_has_a_plain_and_an_async_form_with_one_docstring() -> None:
    for cls in (
        hpcai_async.ServiceClient,
        hpcai_async.TrainingClient,
        hpcai_async.SamplingClient,
        hpcai_async.RestClient,
        hpcai_async.ReferenceClient,
    ):
        for name in dir(cls):
            if name.endswith("_async") and not name.startswith("_"):
                plain = getattr(cls, name.removesuffix("_async"))
                assert callable(plain), name
                doc = getattr(cls, name).__doc__ or ""
                if getattr(plain, "__wrapped__", None) is getattr(cls, name):
                    assert doc and doc in (plain.__doc__ or ""), name  # generated: one docstring
                else:  # a constructor with nothing to wait for: the coroutine delegates
                    assert doc.startswith(f"Same as ``{plain.__name__}``"), name


def test_importing_the_client_does_not_import_torch_or_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, hpcai_async; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------- chunking


def test_chunks_hold_at_most_128_datums() -> None:
    data = [datum(2) for _ in range(2 * MAX_CHUNK_LEN + 1)]
    chunks = chunk_data(data)
    assert [len(c) for c in chunks] == [MAX_CHUNK_LEN, MAX_CHUNK_LEN, 1]
    assert [d for c in chunks for d in c] == data  # order kept, nothing lost


def test_chunks_hold_at_most_500_000_numbers() -> None:
    # 3 * 60_000 numbers each: two fit (360 000), a third would make 540 000
    data = [datum(60_000) for _ in range(5)]
    assert data[0].num_numbers == 180_000
    assert [len(c) for c in chunk_data(data)] == [2, 2, 1]


def test_chunk_boundary_is_inclusive_at_exactly_500_000() -> None:
    # 250 000 + 250 000 = exactly the limit: one chunk; one more number splits
    a = types.Datum(model_input=types.ModelInput.from_ints(np.zeros(250_000, np.int64)), loss_fn_inputs={})
    b = types.Datum(model_input=types.ModelInput.from_ints(np.zeros(250_001, np.int64)), loss_fn_inputs={})
    assert a.num_numbers * 2 == MAX_CHUNK_NUMBER_COUNT
    assert [len(c) for c in chunk_data([a, a])] == [2]
    assert [len(c) for c in chunk_data([a, b])] == [1, 1]


def test_an_oversized_datum_goes_alone() -> None:
    big = datum(200_000)  # 600 000 numbers > the limit
    small = datum(10)
    chunks = chunk_data([small, big, small])
    assert [len(c) for c in chunks] == [1, 1, 1]
    assert chunks[1] == [big]


def test_no_data_no_chunks() -> None:
    assert chunk_data([]) == []


# ----------------------------------------------------------------------------------------- combining


def out(n: int, metrics: dict[str, float], kind: str = "cross_entropy") -> types.ForwardBackwardOutput:
    outputs = [{"logprobs": types.TensorData(data=[float(i)], dtype="float32", shape=[1])} for i in range(n)]
    return types.ForwardBackwardOutput(loss_fn_output_type=kind, loss_fn_outputs=outputs, metrics=metrics)


def test_combine_every_reduction() -> None:
    a = {
        "loss:mean": 1.0,
        "n:sum": 3.0,
        "lo:min": 5.0,
        "hi:max": 1.0,
        "gap:slack": 1.0,
        "tag:unique": 7.0,
        "h:hash_unordered": 11.0,
    }
    b = {
        "loss:mean": 4.0,
        "n:sum": 1.0,
        "lo:min": 2.0,
        "hi:max": 9.0,
        "gap:slack": 4.0,
        "tag:unique": 8.0,
        "h:hash_unordered": 12.0,
    }
    got = combine_metrics([a, b], [3, 1])  # weights: datums per chunk
    assert got["loss:mean"] == pytest.approx((1.0 * 3 + 4.0 * 1) / 4)
    assert got["n:sum"] == 4.0
    assert got["lo:min"] == 2.0
    assert got["hi:max"] == 9.0
    assert got["gap:slack"] == pytest.approx(4.0 - (1.0 * 3 + 4.0) / 4)
    assert got["tag:unique"] == 7.0 and got["tag:unique_1"] == 8.0
    assert got["h:hash_unordered"] == hash((11, 12))
    # order-insensitive
    assert combine_metrics([b, a], [1, 3])["h:hash_unordered"] == got["h:hash_unordered"]


def test_combine_keeps_only_keys_every_chunk_has() -> None:
    got = combine_metrics(
        [{"a:sum": 1.0, "b:sum": 2.0}, {"a:sum": 3.0}, {"a:sum": 5.0, "c:sum": 1.0}], [1, 1, 1]
    )
    assert got == {"a:sum": 9.0}


def test_combine_survives_keys_without_exactly_one_colon() -> None:
    a = {"plain": 1.0, "a:b:c": 2.0, "loss:sum": 1.0}
    b = {"plain": 5.0, "a:b:c": 6.0, "loss:sum": 2.0}
    assert combine_metrics([a, b], [1, 1]) == {"plain": 1.0, "a:b:c": 2.0, "loss:sum": 3.0}


def test_combine_drops_unknown_reductions_and_handles_empty_chunks() -> None:
    assert combine_metrics([{"x:median": 1.0}, {"x:median": 2.0}], [1, 1]) == {}
    # zero datums everywhere: an unweighted mean instead of a division by zero
    assert combine_metrics([{"m:mean": 1.0}, {"m:mean": 3.0}], [0, 0]) == {"m:mean": 2.0}


def test_combine_outputs_concatenates_in_chunk_order_even_for_one_chunk() -> None:
    one = combine_outputs([out(2, {"h:hash_unordered": 5.0, "loss:sum": 1.0})])
    assert one.metrics == {"h:hash_unordered": hash((5,)), "loss:sum": 1.0}  # transformed even alone
    both = combine_outputs([out(2, {"loss:sum": 1.0}), out(1, {"loss:sum": 2.0}, kind="other")])
    assert both.loss_fn_output_type == "cross_entropy"
    assert [o["logprobs"].tolist() for o in both.loss_fn_outputs] == [[0.0], [1.0], [0.0]]
    assert combine_outputs([]).loss_fn_outputs == []


# -------------------------------------------------------------------------------- paths, names


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("hpcai://run-1/weights/step1_training", ("run-1", "training", "step1_training")),
        ("hpcai://run-1/sampler_weights/step1_sampler", ("run-1", "sampler", "step1_sampler")),
        ("hpcai://run-1/training/step1", ("run-1", "training", "step1")),
        ("hpcai://run-1/sampler/a/b", ("run-1", "sampler", "a/b")),
    ],
)
def test_parse_both_checkpoint_path_forms(path: str, expected: tuple[str, str, str]) -> None:
    assert tuple(parse_checkpoint_path(path)) == expected


@pytest.mark.parametrize(
    "path",
    [
        "run-1/weights/x",
        "hpcai://run-1/x",
        "hpcai://run-1/other/x",
        "hpcai:///weights/x",
        "hpcai://r/weights/",
    ],
)
def test_bad_checkpoint_paths_are_value_errors(path: str) -> None:
    with pytest.raises(ValueError, match="not a checkpoint path"):
        parse_checkpoint_path(path)


def test_tokenizer_names_follow_the_official_rules() -> None:
    assert tokenizer_id("meta-llama/Llama-3.1-8B") == "baseten/Meta-Llama-3-tokenizer"
    assert tokenizer_id("Qwen/Qwen3-8B/fp8") == "Qwen/Qwen3-8B"
    assert tokenizer_id("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


# ----------------------------------------------------------------------------------------- backoff


def test_retry_after_forms_and_limits() -> None:
    assert retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after": "0"}) is None  # not in (0, 60]
    assert retry_after({"retry-after": "600"}) is None
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    first = [backoff_delay(0) for _ in range(50)]
    assert all(0.18 <= d <= 0.25 for d in first) and len(set(first)) > 1
    assert all(7.5 <= backoff_delay(20) <= 10.0 for _ in range(10))
