"""The bench harness cannot rot: every bench module imports, and the tiniest configurations run (ours only).

Benchmarks themselves never run in the test suite (``python -m bench`` does that). These run each new kind of
measurement once at toy size: both server modes, the bare-transport floors, the codec floor, the GRPO
iteration on the real engine, and tinker's codec where its venv is already built.
"""

from __future__ import annotations

import importlib

import pytest

from bench import _floor, _tinker, codec, grpo, latency, pipeline
from bench.__main__ import BENCHES
from bench._common import row, run_child, table
from bench._servers import MODES, engine_server, fixture_server, null_server


@pytest.fixture(autouse=True)
def _plain_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCAI_ASYNC_NO_UVLOOP", "1")


@pytest.mark.parametrize("name", BENCHES)
def test_bench_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.run)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_codec_tiny(fmt: str) -> None:
    # ours_encode / ours_decode check that the bodies round-trip the arrays exactly before timing them
    enc = codec.ours_encode(fmt, batch=2, seq=300, repeat=1)
    dec = codec.ours_decode(fmt, batch=2, seq=300, repeat=1)
    assert enc["ms"] > 0 and enc["bytes"] > 0
    assert dec["ms"] > 0 and dec["bytes"] > 0


def test_codec_floor_is_the_same_json() -> None:
    # plain msgspec structs must give the very bytes our JSON encoder does, or the floor measures other work
    plain = codec.plain_encode(batch=2, seq=300, repeat=1)
    ours = codec.ours_encode("json", batch=2, seq=300, repeat=1)
    assert plain["bytes"] == ours["bytes"]
    assert codec.plain_decode(batch=2, seq=300, repeat=1)["ms"] > 0


def test_tinker_codec_tiny() -> None:
    if not _tinker._STAMP.exists():
        pytest.skip("bench/.venv-tinker not built (python -m bench codec builds it)")
    for func in ("tinker_encode", "tinker_decode"):
        out = _tinker.run("codec", func, {"batch": 2, "seq": 64, "repeat": 1}, timeout=60)
        assert out.get("ms", 0) > 0, out


def test_latency_tiny_against_fixture() -> None:
    with fixture_server(delay=0.005, mode="try_again") as srv:
        out = latency.ours(**srv.cfg(), n=2, warmup=1)
    assert 0 < out["ms"] < 5000  # a 5 ms job (timers may fire a clock tick early)


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_tiny_in_both_modes(mode: str) -> None:
    with null_server(mode) as srv:
        features = srv.handle.dialect
        out = pipeline.ours(**srv.cfg(), calls=3, rounds=1)
    assert features == mode
    assert out["calls_per_s"] > 0 and out["cpu_us_per_call"] > 0


def test_floors_tiny_against_hosted_server() -> None:
    with null_server("hosted") as srv:
        assert _floor.pipeline(**srv.cfg(), calls=3, rounds=1)["calls_per_s"] > 0
        assert _floor.sampling(**srv.cfg(), calls=5, rounds=1)["connections"] >= 1
        assert _floor.loop_lag(**srv.cfg(), calls=10)["p99_ms"] >= 0
    with null_server("hosted", long_poll_s=0.0) as srv:  # try_again at once: the floor polls until done
        assert _floor.latency(**srv.cfg(), n=1, warmup=0)["ms"] > 0


def test_grpo_rewards_are_group_normalised() -> None:
    advantages = grpo._rewards([[[2, 4], [1, 3], [2, 3], [1, 2]], [[5], [7]]])
    assert advantages[0] == pytest.approx([1.414, -1.414, 0.0, 0.0], abs=1e-3)
    assert advantages[1] == [0.0, 0.0]  # every sample equally good: nothing to learn
    d = grpo._datum_inputs([1, 2, 3], [4, 5], [-0.5, -0.25], 1.5)
    assert d["input"] == [1, 2, 3, 4] and d["target_tokens"] == [2, 3, 4, 5]
    assert d["logprobs"] == [0.0, 0.0, -0.5, -0.25] and d["advantages"] == [0.0, 0.0, 1.5, 1.5]


def test_grpo_iteration_tiny_on_the_real_engine() -> None:
    with engine_server(threads=1, dialect="hosted") as srv:
        out = run_child(
            __import__("sys").executable, "grpo", "ours", {**srv.cfg(), "prompts": 1, "iterations": 1}
        )
    assert out.get("s", 0) > 0, out


def test_table_formats_rows() -> None:
    rows = [
        row("metric", "ms", 1.0, 10.0, "≥ 5x", True, local=0.5, floor=0.8),
        row("other", "", None, 2.0, "", None),
    ]
    text = table(rows)
    assert "| ours, hosted |" in text and "| floor |" in text and "| ours, local |" in text
    assert "10.0x" in text and "20.0x" in text and "0.80x" in text and "| other |" in text
