"""The bench harness cannot rot: every bench module imports, and the tiniest configurations run (ours only).

Benchmarks themselves never run in the test suite (``python -m bench`` does that).
"""

from __future__ import annotations

import importlib

import pytest

from bench import codec, latency
from bench.__main__ import BENCHES
from bench._common import row, table
from bench._servers import fixture_server


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


def test_latency_tiny_against_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCAI_ASYNC_NO_UVLOOP", "1")
    with fixture_server(delay=0.005, mode="try_again") as srv:
        out = latency.ours(**srv.cfg(), n=2, warmup=1)
    assert 0 < out["ms"] < 5000  # a 5 ms job (timers may fire a clock tick early)


def test_table_formats_rows() -> None:
    text = table([row("metric", "ms", 1.0, 10.0, "≥ 5x", True), row("other", "", None, 2.0, "", None)])
    assert "10.0x" in text and "| other |" in text
