"""Code written for the official hpcai 0.2.0 SDK runs on hpcai_async by changing the import (issue 9's gaps).

Each test here pins one difference that made an official program compute something else on our client:
tensor payloads that read as bytes, types that alias the caller's buffers, defaults, names, module paths.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest
from client_fixtures import client, datum, hf_model, run

from hpcai_async import _tensor, types

BUILTIN = "hpcai-async/tiny-qwen3"
NULL_MODEL = "null/instant"


@pytest.fixture(scope="module")
def plain_model() -> Any:
    """The built-in model loaded by plain transformers: the reference for logprobs."""
    pytest.importorskip("torch")
    return hf_model()


def _direct_logprobs(model: Any, ids: list[int]) -> list[float]:
    import torch

    logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    out: list[float] = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    return out


# ------------------------------------------------------------------------------------- TensorData.data


@pytest.mark.parametrize("dialect", ["local", "hosted"])  # MessagePack tensors (raw bytes) / JSON lists
def test_tensor_data_reads_as_python_floats_with_either_codec(
    server_factory: Any, real_engine: Any, plain_model: Any, dialect: str
) -> None:
    srv = server_factory(engine=real_engine, dialect=dialect)
    ids = [3, 17, 256, 1001, 42, 7, 99]

    async def main() -> types.ForwardBackwardOutput:
        async with client(srv) as service:
            tc = await service.create_lora_training_client_async(BUILTIN, rank=4)
            return await (await tc.forward_async([datum(ids)], "cross_entropy"))

    out = run(main)
    logprobs = out.loss_fn_outputs[0]["logprobs"]
    carried = type(logprobs.raw)
    assert carried is (bytes if dialect == "local" else list)  # the codec really differed
    data = logprobs.data
    assert type(data) is list and all(type(x) is float for x in data)
    assert data == logprobs.to_numpy().tolist()
    # a fresh adapter (B = 0) leaves the base model: the numbers are the direct PyTorch ones
    np.testing.assert_allclose(data, _direct_logprobs(plain_model, ids), rtol=1e-4, atol=1e-4)
    assert sum(data) < 0 and data[:3] == logprobs.tolist()[:3]


def test_from_numpy_and_from_torch_read_as_python_numbers() -> None:
    torch = pytest.importorskip("torch")
    floats = types.TensorData.from_numpy(np.array([[0.5, -1.25]], np.float32))
    ints = types.TensorData.from_torch(torch.tensor([1, 2, 3]))
    assert floats.data == [0.5, -1.25] and all(type(x) is float for x in floats.data)
    assert ints.data == [1, 2, 3] and all(type(x) is int for x in ints.data)
    assert floats.shape == [1, 2] and floats.to_numpy().shape == (1, 2)
    assert isinstance(ints.to_torch(), torch.Tensor) and ints.to_torch().tolist() == [1, 2, 3]


def test_msgpack_decoded_tensor_reads_as_a_list_and_encodes_the_same() -> None:
    enc = msgspec.msgpack.Encoder(enc_hook=_tensor.msgpack_enc_hook)
    sent = types.TensorData.from_numpy(np.array([0.25, -7.5, 3.0], np.float32))
    got = msgspec.msgpack.decode(enc.encode(sent), type=types.TensorData)
    assert isinstance(got.raw, bytes)
    assert got.data == [0.25, -7.5, 3.0] and got.data[:2] == [0.25, -7.5]
    got.data[2] = 1.0  # the list is the tensor from now on, as with the official (pydantic) type
    assert got.to_numpy().tolist() == [0.25, -7.5, 1.0] and got.size == 3
    again = msgspec.msgpack.decode(enc.encode(got), type=types.TensorData)
    assert again.data == [0.25, -7.5, 1.0]


# ------------------------------------------------------------------------------------- copies


def test_types_keep_their_own_copy_of_the_callers_buffers() -> None:
    buf = [5, 6, 7]
    chunk = types.EncodedTextChunk(tokens=buf)
    buf.clear()  # the cookbook's rl/data_processing.py reuses its buffer like this
    assert chunk.tokens == [5, 6, 7] and chunk.length == 3
    arr = np.array([1, 2, 3], dtype=np.int64)
    from_array = types.EncodedTextChunk(tokens=arr)
    tensor = types.TensorData(data=arr, dtype="int64")
    weights = [1.0, 0.0]
    listed = types.TensorData(data=weights, dtype="float32")
    arr[:] = 0
    weights[0] = 9.0
    assert from_array.tokens == [1, 2, 3] and tensor.data == [1, 2, 3] and listed.data == [1.0, 0.0]
    model_input = types.ModelInput.from_ints(buf := [1, 2])
    buf.append(3)
    assert model_input.to_ints() == [1, 2]


# ------------------------------------------------------------------------------------- checkpoint_utils


def test_checkpoint_utils_write_the_official_file_format(null_server: Any, tmp_path: Any) -> None:
    from official_env import official_python, run_official

    from hpcai_async import checkpoint_utils

    async def main() -> dict[str, str]:
        async with client(null_server) as service:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4)
            return await checkpoint_utils.save_checkpoint_async(
                tc, "step1", str(tmp_path), {"batch": 1, "epoch": 0}, kind="both"
            )

    paths = run(main)
    assert set(paths) == {"state_path", "sampler_path"}
    with client(null_server) as service:  # the blocking form, from a plain script
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        sampler_only = checkpoint_utils.save_checkpoint(tc, "s2", str(tmp_path), {"batch": 2}, kind="sampler")
    assert set(sampler_only) == {"sampler_path"}
    records = checkpoint_utils.load_checkpoints_file(str(tmp_path))
    assert records == [
        {"name": "step1", "batch": 1, "epoch": 0, **paths},
        {"name": "s2", "batch": 2, **sampler_only},
    ]
    last = checkpoint_utils.get_last_checkpoint(str(tmp_path))  # the sampler-only save cannot resume
    assert last == records[0]
    assert checkpoint_utils.get_last_checkpoint(str(tmp_path), "sampler_path") == records[1]
    assert checkpoint_utils.get_last_checkpoint(str(tmp_path / "nothing")) is None
    python = official_python()
    if python is not None:  # the official SDK resumes from the file we wrote
        script = "import json, sys; from hpcai import checkpoint_utils as c; "
        script += "print(json.dumps(c.get_last_checkpoint(sys.argv[1])))"
        assert run_official(python, script, str(tmp_path)) == records[0]


# ------------------------------------------------------------------------------------- failed restores


def _loaded_runs(srv: Any) -> set[str]:
    return {m.model_id for m in srv.scheduler.models.values() if m.status not in ("unloading", "unloaded")}


def test_a_failed_restore_unloads_the_run_it_created(null_server: Any) -> None:
    from fault_proxy import FaultProxy

    from hpcai_async import BadRequestError, NotFoundError

    async def main(proxy_url: str) -> None:
        async with client(null_server) as service, client(null_server, base_url=proxy_url) as proxied:
            tc = await service.create_lora_training_client_async(NULL_MODEL, rank=4, train_mlp=True)
            saved = await (await tc.save_state_async("good"))
            before = _loaded_runs(null_server)
            bad_path = saved.path.replace("/good", "/missing")
            with pytest.raises(NotFoundError, match="missing"):
                await service.create_training_client_from_state_async(bad_path)
            assert _loaded_runs(null_server) == before
            # a layout mismatch: the run record (as from the hosted service) names only the rank, so the new
            # run gets the default layout (attention only) and the checkpoint (attention + MLP) does not fit
            run_record = json.loads(
                msgspec.json.encode(await service.create_rest_client().get_training_run_async(tc.model_id))
            )
            run_record.pop("lora_config")
            proxy.inject(
                f"training_runs/{tc.model_id}", "status", status=200, body=json.dumps(run_record).encode()
            )
            with pytest.raises(BadRequestError, match="LoRA layout"):
                await proxied.create_training_client_from_state_with_optimizer_async(saved.path)
            assert _loaded_runs(null_server) == before
            restored = await service.create_training_client_from_state_async(saved.path)  # still works
            assert _loaded_runs(null_server) == before | {restored.model_id}

    with FaultProxy(null_server.url) as proxy:
        run(lambda: main(proxy.url))


# ------------------------------------------------------------------------------------- checkpoints (REST)


def test_checkpoints_list_newest_first_and_download_as_bytes_or_to_a_file(
    null_server: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    import io
    import tarfile

    from fault_proxy import FaultProxy

    from hpcai_async import ConfigurationError

    monkeypatch.chdir(tmp_path)  # a download without destination must not write a file here
    with (
        FaultProxy(null_server.url) as proxy,
        client(null_server, base_url=proxy.url) as service,
    ):
        tc = service.create_lora_training_client(NULL_MODEL, rank=4)
        saved = [tc.save_state(f"c{i}").result().path for i in range(3)]
        rest = service.create_rest_client()
        listed = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert [c.checkpoint_path for c in listed] == saved[::-1]  # newest first
        assert [c.time for c in listed] == sorted((c.time for c in listed), reverse=True)

        proxy.inject("/archive", "truncate", times=1)  # a cut body, then a good retry: the bytes start over
        data = rest.download_checkpoint_archive_by_checkpoint_path(saved[0]).result()
        assert isinstance(data, bytes)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            assert archive.getnames()
        assert list(tmp_path.iterdir()) == []
        on_disk = rest.download_checkpoint_archive(tc.model_id, "c0_training", tmp_path / "a.tar.gz").result()
        assert on_disk == tmp_path / "a.tar.gz" and on_disk.read_bytes() == data
        with pytest.raises(ConfigurationError, match=r"max_bytes=100\b.*destination="):
            rest.download_checkpoint_archive(tc.model_id, "c0_training", max_bytes=100).result()
