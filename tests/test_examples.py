"""The examples, run with short configurations against the real local server, and the plot helpers."""

from __future__ import annotations

import asyncio
import statistics
import struct
from pathlib import Path

import pytest

from examples import _common, _plot, demo, grpo, quickstart, resume, sft
from hpcai_async import types

# --------------------------------------------------------------------------------------------- the examples


def test_quickstart_prints_every_result(server, capsys: pytest.CaptureFixture[str]) -> None:
    results = quickstart.run(server.url, server.api_key)
    out = capsys.readouterr().out

    expected = {
        "get_tokenizer": list,
        "forward": types.ForwardBackwardOutput,
        "forward_backward": types.ForwardBackwardOutput,
        "optim_step": types.OptimStepResponse,
        "get_info": types.GetInfoResponse,
        "save_state": types.SaveWeightsResponse,
        "load_state": types.LoadWeightsResponse,
        "save_weights_for_sampler": types.SaveWeightsForSamplerResponse,
        "sample": types.SampleResponse,
        "unload_model": types.UnloadModelResponse,
        "list_checkpoints": types.CheckpointsListResponse,
    }
    assert list(results) == list(expected)
    for name, kind in expected.items():
        assert isinstance(results[name], kind), name
        assert f">>> {name}\n" in out
    assert "ForwardBackwardOutput(" in out and "loss:mean" in out
    assert results["forward"].metrics["loss:mean"] == pytest.approx(
        results["forward_backward"].metrics["loss:mean"]
    )
    assert results["optim_step"].metrics["step:max"] == 1.0
    model_id = results["get_info"].model_id
    assert results["save_state"].path == f"hpcai://{model_id}/weights/initial_training"
    assert len(results["sample"].sequences) == 3
    listed = {c.checkpoint_id for c in results["list_checkpoints"].checkpoints}
    assert listed == {"initial_training", "initial_sampler"}  # unloading kept them


def test_sft_loss_falls_and_checkpoints_are_saved(server) -> None:
    result = asyncio.run(
        sft.train(server.url, server.api_key, steps=16, batch_size=8, checkpoint_every=5, verbose=False)
    )
    assert len(result.losses) == 16
    assert statistics.fmean(result.losses[-3:]) < 0.5 * statistics.fmean(result.losses[:3])
    names = [path.rsplit("/", 1)[-1] for path in result.checkpoints]
    assert names == ["sft-step5_training", "sft-step10_training", "sft-step15_training", "sft-final_training"]
    assert len(result.before) == len(result.after) == len(result.answers) == 32
    assert result.accuracy_after >= result.accuracy_before


def test_sft_output_shows_answers_side_by_side(server, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(sft.train(server.url, server.api_key, steps=2, checkpoint_every=100))
    out = capsys.readouterr().out
    assert "question" in out and "before" in out and "after" in out and "expected" in out
    assert "What color is a blicket?" in out
    assert "correct:" in out


def test_grpo_trains_on_groups_of_samples(server) -> None:
    result = asyncio.run(
        grpo.train(server.url, server.api_key, iterations=2, max_operand=5, group_size=4, verbose=False)
    )
    assert len(result.rewards) == 2
    assert all(0.0 <= r <= 1.0 for r in result.rewards)
    assert result.samples == 2 * 36 * 4  # every problem, every iteration, one request per sample
    assert len(result.losses) == 2 * 2  # two updates per iteration: some groups had mixed rewards
    assert result.greedy_before is not None and result.greedy_after is not None


def test_resume_continues_exactly_where_it_stopped(server) -> None:
    result = asyncio.run(resume.run(server.url, server.api_key, steps=6, resume_at=3, verbose=False))
    assert len(result.before) == 3 and len(result.reference) == len(result.resumed) == 3
    # with its optimizer state the resumed run is the uninterrupted run
    assert result.resumed == pytest.approx(result.reference, rel=1e-4, abs=1e-5)
    # with a fresh optimizer it starts from the same weights (same first loss), then takes different steps
    assert result.weights_only[0] == pytest.approx(result.reference[0], rel=1e-4, abs=1e-5)
    assert result.weights_only[1:] != pytest.approx(result.reference[1:], rel=1e-4, abs=1e-5)
    assert result.reference[-1] < result.before[0]


def test_demo_writes_the_png_and_the_terminal_charts(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = demo.run(
        server.url,
        server.api_key,
        out=tmp_path / "demo.png",
        sft_steps=3,
        grpo_iterations=2,
        grpo_prompts=4,
        grpo_group_size=4,
        verbose=False,
    )
    demo.print_summary(result)
    out = capsys.readouterr().out
    assert "SFT loss" in out and "GRPO mean reward" in out
    if _plot.have_matplotlib():
        assert result.png is not None and _png_size(result.png) == (1120, 380)
        assert f"curves written to {result.png}" in out
    else:
        assert result.png is None and "matplotlib is not installed" in out


def test_mains_use_the_environments_service(
    server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HPCAI_BASE_URL", server.url)
    monkeypatch.setenv("HPCAI_API_KEY", server.api_key)
    assert resume.main(["--steps", "4", "--resume-at", "2"]) == 0
    out = capsys.readouterr().out
    assert "local server" not in out  # it used the environment's, it did not start its own
    assert "-- checkpoint --" in out and "resumed with optimizer vs uninterrupted" in out


def test_demo_main_starts_its_own_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "demo.png"
    assert demo.main(["--sft-steps", "2", "--grpo-iterations", "1", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "local server at http://127.0.0.1:" in out
    if _plot.have_matplotlib():
        assert f"curves written to {png}" in out and _png_size(png) == (1120, 380)
    else:
        assert not png.exists()


# --------------------------------------------------------------------------------------------- helpers


def test_grpo_reward_and_advantages() -> None:
    assert grpo.reward(" 7", 3, 4) == 1.0
    assert grpo.reward(" 7\n", 3, 4) == 1.0
    assert grpo.reward(" 8", 3, 4) == 0.0
    assert grpo.reward(" seven", 3, 4) == 0.0
    assert grpo.group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    adv = grpo.group_advantages([1.0, 0.0, 0.0, 0.0])
    assert sum(adv) == pytest.approx(0.0)
    assert adv[0] > 0 > adv[1]
    assert statistics.pstdev(adv) == pytest.approx(1.0)


def test_rl_datum_is_aligned_with_zeros_on_the_prompt() -> None:
    seq = types.SampledSequence(stop_reason="stop", tokens=[7, 8], logprobs=[-0.5, -0.25])
    datum = grpo.rl_datum([1, 2, 3], seq, 2.0)
    assert datum.model_input.to_ints() == [1, 2, 3, 7]
    inputs = {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}
    assert inputs["target_tokens"] == [2, 3, 7, 8]
    assert inputs["logprobs"] == [0.0, 0.0, -0.5, -0.25]
    assert inputs["advantages"] == [0.0, 0.0, 2.0, 2.0]


def test_sft_datum_trains_only_the_completion() -> None:
    class Chars:  # a tokenizer that maps each character to its code
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    datum = _common.sft_datum(Chars(), "Q:", " a\n")
    assert datum.model_input.to_ints() == [ord(c) for c in "Q: a"]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [ord(c) for c in ": a\n"]
    assert datum.loss_fn_inputs["weights"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_facts_dataset_ships_with_the_repo() -> None:
    facts = _common.load_facts()
    assert len(facts) == 32
    assert len({q for q, _ in facts}) == 32
    assert all(q.endswith("?") and a and " " not in a for q, a in facts)


def _png_size(path: Path) -> tuple[int, int]:
    """A PNG's width and height from its header (after checking the signature and that it is complete)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_render_png_draws_the_curves(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    losses = [3.0 / (1 + i / 5) for i in range(40)]
    path = _plot.render_png(
        tmp_path / "sub" / "c.png", [_plot.Panel("loss", losses, smooth=0.8)], panel_size=(300, 200)
    )
    assert path is not None and _png_size(path) == (300, 200)
    pixels = matplotlib.image.imread(path)[..., :3]
    blue = [int(_plot.BLUE[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    assert (abs(pixels - blue).max(axis=-1) < 0.02).sum() > 100  # the line is there, in its colour


def test_without_matplotlib_only_the_terminal_charts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_plot, "_pyplot", lambda: None)  # as if matplotlib were not installed
    assert not _plot.have_matplotlib()
    assert _plot.render_png(tmp_path / "x.png", [_plot.Panel("loss", [1.0, 0.5])]) is None
    assert not (tmp_path / "x.png").exists()
    result = demo.DemoResult(
        sft.SFTResult(losses=[2.0, 1.0], questions=["q?"], answers=["a"], before=["b"], after=["a"]),
        grpo.GRPOResult(rewards=[0.2, 0.4]),
        None,
        {"total": 1.0},
    )
    demo.print_summary(result)
    out = capsys.readouterr().out
    assert "SFT loss" in out and "GRPO mean reward" in out and "matplotlib is not installed" in out


def test_braille_chart_and_sparkline() -> None:
    chart = _plot.braille_chart([3, 2, 1.5, 1.2, 1.0], "loss", width=20, height=4)
    lines = chart.splitlines()
    assert lines[0].strip() == "loss"
    assert len(lines) == 1 + 4 + 1
    assert lines[1].startswith("3 ") or lines[1].lstrip().startswith("3")
    assert "5 steps" in lines[-1]
    assert len(_plot.sparkline([1, 2, 3, 4], width=10)) == 4
    assert _plot.sparkline([]) == ""
