"""The reference walkthrough through the official ``hpcai`` SDK, unchanged, against our local server.

The official SDK is not a dependency: it runs in its own virtual environment, built on first use by
``official_env.official_python()`` (``.official/venv``; ``$HPCAI_OFFICIAL_PYTHON`` overrides), in a
subprocess because the two SDKs do not share an interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from official_env import official_python

from hpcai_async import ServiceClient, types

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = "hpcai-async/tiny-qwen3"

WALKTHROUGH = r"""
import json, sys
from hpcai import ServiceClient, types

service = ServiceClient()
tc = service.create_lora_training_client(base_model=sys.argv[1], rank=8)
datum = types.Datum(
    model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
    loss_fn_inputs={
        "target_tokens": types.TensorData(data=[2, 3, 4, 5, 6], dtype="int64", shape=[5]),
        "weights": types.TensorData(data=[1.0, 1.0, 1.0, 1.0, 1.0], dtype="float32", shape=[5]),
    },
)
out = {"model_id": tc.model_id}
fwd = tc.forward([datum], loss_fn="cross_entropy").result()
out["forward"] = {"type": fwd.loss_fn_output_type, "metrics": fwd.metrics,
                  "logprobs": fwd.loss_fn_outputs[0]["logprobs"].data,
                  "keys": sorted(fwd.loss_fn_outputs[0])}
fb = tc.forward_backward([datum], loss_fn="cross_entropy").result()
out["forward_backward"] = fb.metrics
adam = types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-12)
opt = tc.optim_step(adam_params=adam).result()
out["optim_step"] = opt.metrics
info = tc.get_info()
out["info"] = {"model_name": info.model_data.model_name, "is_lora": info.is_lora, "lora_rank": info.lora_rank}
out["save_state"] = tc.save_state("initial").result().path
out["load_state"] = tc.load_state(out["save_state"]).result().path
sampler_path = tc.save_weights_for_sampler("initial").result().path
out["sampler_path"] = sampler_path
sc = service.create_sampling_client(model_path=sampler_path, base_model=sys.argv[1])
res = sc.sample(prompt=types.ModelInput.from_ints([1, 2, 3]), num_samples=2,
                sampling_params=types.SamplingParams(max_tokens=4, seed=3)).result()
out["sample"] = [s.tokens for s in res.sequences]
out["unload"] = tc.unload_model().result().model_id
listing = service.create_rest_client().list_checkpoints(tc.model_id).result()
out["checkpoints"] = sorted((c.checkpoint_id, c.checkpoint_type) for c in listing.checkpoints)
print(json.dumps(out))
"""


def test_reference_walkthrough_through_the_official_sdk(server) -> None:  # type: ignore[no-untyped-def]
    python = official_python()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCAI_")}
    env.update(HPCAI_BASE_URL=server.url, HPCAI_API_KEY=server.api_key, HPCAI_TELEMETRY="0")
    command = [python, "-c", WALKTHROUGH, BUILTIN]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = out["model_id"]

    fwd = out["forward"]
    assert fwd["type"] == "cross_entropy" and fwd["keys"] == ["elementwise_loss", "logprobs"]
    assert set(fwd["metrics"]) == {"loss:mean", "num_examples:sum", "step:max"}
    assert fwd["metrics"]["loss:mean"] == pytest.approx(-np.mean(fwd["logprobs"]), rel=1e-5)
    assert out["forward_backward"]["loss:mean"] == pytest.approx(fwd["metrics"]["loss:mean"], rel=1e-6)
    assert out["optim_step"]["step:max"] == 1.0
    assert out["optim_step"]["learning_rate:mean"] == pytest.approx(1e-2)
    assert out["optim_step"]["recent_loss:mean"] == pytest.approx(fwd["metrics"]["loss:mean"], rel=1e-6)
    assert out["info"] == {"model_name": BUILTIN, "is_lora": True, "lora_rank": 8}
    assert out["save_state"] == f"hpcai://{run}/weights/initial_training"
    assert out["load_state"] == out["save_state"]
    assert out["sampler_path"] == f"hpcai://{run}/sampler_weights/initial_sampler"
    assert len(out["sample"]) == 2 and all(len(t) <= 4 for t in out["sample"])
    assert out["unload"] == run
    assert out["checkpoints"] == [["initial_sampler", "sampler"], ["initial_training", "training"]]

    # The same weights seen through our client: the official SDK's forward agrees with ours on the checkpoint.
    with ServiceClient(base_url=server.url, api_key=server.api_key) as service:
        ours = service.create_training_client_from_state(out["save_state"])
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
            loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5},
        )
        trained = ours.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_numpy()
    # one AdamW step with lr 1e-2 moved the logprobs of the trained targets up
    assert trained.sum() > sum(fwd["logprobs"])


SDK_BUGS = r"""
import json, sys
from hpcai import ServiceClient

service = ServiceClient()
tc = service.create_lora_training_client(base_model=sys.argv[1], rank=4)
path = tc.save_state("bug").result().path
sampler = tc.save_weights_for_sampler("bug").result().path
out = {"path": path, "sampler": sampler}
out["with_optimizer"] = hasattr(service, "create_training_client_from_state_with_optimizer")
calls = {"from_state": lambda: service.create_training_client_from_state(path),
         "sampling_without_base_model": lambda: service.create_sampling_client(model_path=sampler)}
for name, call in calls.items():
    try:
        call()
        out[name] = "ok"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_the_official_sdks_own_failures_that_its_cookbook_runs_into(server) -> None:  # type: ignore[no-untyped-def]
    """README "Porting from hpcai": what fails in the official SDK itself against our server; ours does it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCAI_")}
    env.update(HPCAI_BASE_URL=server.url, HPCAI_API_KEY=server.api_key, HPCAI_TELEMETRY="0")
    command = [official_python(), "-c", SDK_BUGS, BUILTIN]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["with_optimizer"] is False  # the cookbook's resume path calls it
    assert out["from_state"] == "ValueError: Invalid checkpoint type: weights"  # its own save_state's path
    assert out["sampling_without_base_model"] == "ValueError: base_model must be provided"  # rl_loop's call

    with ServiceClient(base_url=server.url, api_key=server.api_key) as service:
        resumed = service.create_training_client_from_state_with_optimizer(out["path"])
        assert resumed.get_info().model_data.model_name == BUILTIN
        sampler = service.create_sampling_client(model_path=out["sampler"])  # no base_model needed
        prompt = types.ModelInput.from_ints([1, 2, 3])
        res = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=1)).result()
        assert len(res.sequences[0].tokens) <= 2
