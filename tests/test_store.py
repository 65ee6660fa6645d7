"""The checkpoint store: nothing outside it is reached through the server, deletes race safely, crashes and
second servers leave it whole.

Wire-level tests against a real ``LocalServer`` (NullEngine) on 127.0.0.1, whose store folder the test then
tampers with as an attacker or a crash would (links, leftovers, a second server)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from test_server import Factory, Wire, adam_body, wire_test

from hpcai_async.server import LocalServer
from hpcai_async.server.store import Store


async def save(w: Wire, model_id: str, name: str) -> str:
    out = await w.call("save_weights", {"model_id": model_id, "path": name})
    assert "path" in out, out
    return str(out["path"])


async def reach(w: Wire, model_id: str, ckpt: str, path: str) -> dict[str, int]:
    """The status of every way the server could touch checkpoint ``ckpt``: list, archive, load, delete."""
    base = f"/api/v1/training_runs/{model_id}/checkpoints"
    _, listing = await w.get(f"training_runs/{model_id}/checkpoints")
    listed = ckpt in [c["checkpoint_id"] for c in listing["checkpoints"]]
    async with w.session.get(f"{base}/{ckpt}/archive", headers=w.headers) as resp:
        archive = resp.status
        await resp.read()
    loaded, out = await w.post("load_weights", {"model_id": await w.create(), "path": path})
    if loaded == 200:
        loaded = 200 if "error" not in await w.result(out) else 404
    async with w.session.delete(f"{base}/{ckpt}", headers=w.headers) as resp:
        deleted = resp.status
    return {"listed": int(listed), "archive": archive, "load": loaded, "delete": deleted}


def test_a_linked_checkpoint_folder_is_out_of_reach(null_server: LocalServer, tmp_path: Path) -> None:
    assert null_server.store is not None
    outside = tmp_path / "outside"

    async def body(w: Wire) -> None:
        model_id = await w.create()
        path = await save(w, model_id, "s1")
        ckpts = null_server.store.runs_dir / model_id / "checkpoints"  # type: ignore[union-attr]
        shutil.copytree(ckpts / "s1_training", outside)  # a valid checkpoint, but outside the store
        (outside / "secret.txt").write_text("not yours")
        (ckpts / "s2_training").symlink_to(outside, target_is_directory=True)
        got = await reach(w, model_id, "s2_training", path.replace("s1_training", "s2_training"))
        assert got == {"listed": 0, "archive": 404, "load": 404, "delete": 404}, got
        assert (outside / "secret.txt").read_text() == "not yours"  # nothing deleted outside
        got = await reach(w, model_id, "s1_training", path)  # the real one is unharmed
        assert got == {"listed": 1, "archive": 200, "load": 200, "delete": 204}, got

    wire_test(null_server, body)


def test_a_linked_file_inside_a_checkpoint_is_out_of_reach(null_server: LocalServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")

    async def body(w: Wire) -> None:
        model_id = await w.create()
        path = await save(w, model_id, "s1")
        folder = null_server.store.runs_dir / model_id / "checkpoints" / "s1_training"  # type: ignore[union-attr]
        (folder / "extra.txt").symlink_to(secret)
        got = await reach(w, model_id, "s1_training", path)
        assert got == {"listed": 0, "archive": 404, "load": 404, "delete": 404}, got
        assert secret.read_text() == "not yours"
        status, run = await w.get(f"training_runs/{model_id}")
        assert status == 200 and run["last_checkpoint"] is None, run

    wire_test(null_server, body)


def test_the_archive_never_follows_a_link_that_appears_while_it_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    try:
        folder = store.new_work_dir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        ref = _committed(store, folder)
        (tmp_path / "secret.txt").write_text("not yours")
        (ref.directory / "zz.txt").symlink_to(tmp_path / "secret.txt")  # after the lookup
        data = b"".join(store.iter_archive(ref))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            assert sorted(tar.getnames()) == ["adapter_model.safetensors", "meta.json"]
    finally:
        store.close()


def _committed(store: Store, folder: Path) -> Any:
    from hpcai_async import types
    from hpcai_async.server.store import CheckpointMeta, RunRecord, utcnow

    lora = types.LoraConfig(rank=4)
    now = utcnow()
    store.add_run(
        RunRecord(
            run_id="r1", base_model="m", lora_config=lora, owner="o", created=now, last_request_time=now
        )
    )
    meta = CheckpointMeta(
        checkpoint_id="c_training",
        checkpoint_type="training",
        time=now,
        checkpoint_path="hpcai://r1/weights/c_training",
        run_id="r1",
        base_model="m",
        lora_config=lora,
        name="c",
    )
    store.commit_checkpoint(folder, meta)
    return store.get_checkpoint("r1", "c_training")


def test_a_linked_run_folder_is_not_a_run(server_factory: Factory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)

    async def make(w: Wire) -> str:
        model_id = await w.create()
        await save(w, model_id, "s1")
        return model_id

    model_id = wire_test(first, make)
    first.close()
    shutil.move(store / "runs" / model_id, tmp_path / "moved")
    (store / "runs" / model_id).symlink_to(tmp_path / "moved", target_is_directory=True)

    async def after(w: Wire) -> None:
        _, runs = await w.get("training_runs")
        assert runs["training_runs"] == [], runs
        status, out = await w.get(f"training_runs/{model_id}/checkpoints")
        assert status == 404 and str(tmp_path) not in out["message"], out

    wire_test(server_factory(store=store), after)
    assert (tmp_path / "moved" / "checkpoints" / "s1_training" / "meta.json").is_file()


def test_concurrent_deletes_of_one_checkpoint_never_500(null_server: LocalServer) -> None:
    assert null_server.store is not None
    root = str(null_server.store.root)

    async def body(w: Wire) -> None:
        model_id = await w.create()

        async def delete() -> tuple[int, str]:
            url = f"/api/v1/training_runs/{model_id}/checkpoints/s1_training"
            async with w.session.delete(url, headers=w.headers) as resp:
                return resp.status, await resp.text()

        for _ in range(20):  # the race (both find it, one renames it first) needs a few tries to show
            await save(w, model_id, "s1")
            answers = await asyncio.gather(*(delete() for _ in range(8)))
            assert sorted(status for status, _ in answers) == [204] + [404] * 7, answers
            assert not [text for _, text in answers if root in text]  # never the store's own path
            assert all("s1_training" in text for status, text in answers if status == 404)

    wire_test(null_server, body)


def test_orphan_run_json_temp_files_go_when_the_store_opens(server_factory: Factory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)
    model_id = wire_test(first, lambda w: w.create())
    first.close()
    orphan = store / "runs" / model_id / ".run.json.k3j2_x.tmp"  # what a crash mid-write leaves
    orphan.write_bytes(b'{"run_id": "half')
    second = server_factory(store=store)
    assert not orphan.exists() and (store / "runs" / model_id / "run.json").is_file()

    async def after(w: Wire) -> None:
        _, runs = await w.get("training_runs")
        assert [r["training_run_id"] for r in runs["training_runs"]] == [model_id]

    wire_test(second, after)


def test_one_server_per_store(server_factory: Factory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)
    in_progress = store / "tmp" / "save-in-progress"
    in_progress.mkdir()  # the first server's save, half-way
    with pytest.raises(RuntimeError, match=rf"in use by another server \(pid {os.getpid()}\)"):
        LocalServer(store=store, engine=first.engine).__enter__()
    assert in_progress.is_dir()  # the second server wiped nothing

    async def still_works(w: Wire) -> None:
        model_id = await w.create()
        assert (await w.call("optim_step", adam_body(model_id)))["metrics"]["step:max"] == 1

    wire_test(first, still_works)
    first.close()
    second = server_factory(store=store)  # the lock went with the first server
    assert not in_progress.exists()
    wire_test(second, still_works)


# ------------------------------------------------------------------------------------------------ lifetimes


async def save_for(w: Wire, model_id: str, name: str, ttl: int | None) -> str:
    body: dict[str, Any] = {"model_id": model_id, "path": name}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    out = await w.call("save_weights", body)
    assert "path" in out, out
    return str(out["path"])


def test_an_expired_checkpoint_is_out_of_reach_and_says_so(null_server: LocalServer) -> None:
    assert null_server.store is not None

    async def body(w: Wire) -> None:
        model_id = await w.create()
        path = await save_for(w, model_id, "s1", ttl=1)
        folder = null_server.store.runs_dir / model_id / "checkpoints" / "s1_training"  # type: ignore[union-attr]
        got = await reach(w, model_id, "s1_training", path)  # the delete at its end removes it: save again
        assert got == {"listed": 1, "archive": 200, "load": 200, "delete": 204}, got
        path = await save_for(w, model_id, "s1", ttl=1)
        await asyncio.sleep(1.2)
        assert folder.is_dir()  # nobody looked yet (the sweep runs every 30 s here)
        got = await reach(w, model_id, "s1_training", path)
        assert got == {"listed": 0, "archive": 404, "load": 404, "delete": 404}, got
        assert not folder.exists()
        for short in (path, path.replace("/weights/s1_training", "/training/s1")):  # either form of the path
            status, out = await w.post("load_weights", {"model_id": model_id, "path": short})
            assert status == 404 and out["code"] == "checkpoint_expired", out
            assert "expired" in out["message"] and "ttl_seconds" in out["message"], out
        assert str(null_server.store.root) not in out["message"]  # type: ignore[union-attr]

    wire_test(null_server, body)


def test_saving_again_without_a_ttl_keeps_the_checkpoint(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        await save_for(w, model_id, "s1", ttl=1)
        path = await save_for(w, model_id, "s1", ttl=None)  # replaces it, to stay
        await save_for(w, model_id, "s2", ttl=1)
        await save_for(w, model_id, "s2", ttl=3600)  # a longer life
        await asyncio.sleep(1.2)
        assert null_server.store is not None and null_server.store.sweep() == 0
        got = await reach(w, model_id, "s1_training", path)
        assert got == {"listed": 1, "archive": 200, "load": 200, "delete": 204}, got
        _, listing = await w.get(f"training_runs/{model_id}/checkpoints")
        assert [c["checkpoint_id"] for c in listing["checkpoints"]] == ["s2_training"]

    wire_test(null_server, body)


def test_a_bad_ttl_is_refused_by_field_and_saves_nothing(null_server: LocalServer) -> None:
    async def body(w: Wire) -> None:
        model_id = await w.create()
        for bad in (0, -5, 10 * 365 * 24 * 3600 + 1, 10**30, 1.5, "60", True, None, [60]):
            for route in ("save_weights", "save_weights_for_sampler"):
                payload = {"model_id": model_id, "path": "bad", "ttl_seconds": bad}
                status, out = await w.post(route, payload)
                assert status == 400 and "ttl_seconds" in out["message"], (bad, out)
                assert len(out["message"]) < 400, out
        status, out = await w.post(
            "save_weights", {"model_id": model_id, "path": "x" * 500, "ttl_seconds": 5}
        )
        assert status == 400 and "path" in out["message"], out
        _, listing = await w.get(f"training_runs/{model_id}/checkpoints")
        assert listing["checkpoints"] == []
        assert (await w.call("optim_step", adam_body(model_id)))["metrics"]["step:max"] == 1  # still fine

    wire_test(null_server, body)


def test_what_expired_while_no_server_ran_goes_when_the_store_opens(
    server_factory: Factory, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = server_factory(store=store)

    async def make(w: Wire) -> str:
        model_id = await w.create()
        await save_for(w, model_id, "brief", ttl=1)
        await save_for(w, model_id, "kept", ttl=3600)
        return model_id

    model_id = wire_test(first, make)
    first.close()
    time.sleep(1.2)
    ckpts = store / "runs" / model_id / "checkpoints"
    assert (ckpts / "brief_training").is_dir()
    server_factory(store=store)
    assert not (ckpts / "brief_training").exists() and (ckpts / "kept_training").is_dir()


def test_concurrent_lookups_of_an_expired_checkpoint_never_500(null_server: LocalServer) -> None:
    assert null_server.store is not None
    store = null_server.store

    async def body(w: Wire) -> None:
        model_id = await w.create()
        base = f"/api/v1/training_runs/{model_id}/checkpoints"

        async def touch(kind: int) -> int:
            if kind == 0:
                status, _ = await w.get(f"training_runs/{model_id}/checkpoints")
                return status
            method = w.session.delete if kind == 1 else w.session.get
            url = f"{base}/s1_training" + ("/archive" if kind == 2 else "")
            async with method(url, headers=w.headers) as resp:
                await resp.read()
                return resp.status

        for _ in range(3):  # the race (several find it expired, one renames it first) needs a few tries
            await save_for(w, model_id, "s1", ttl=1)
            await asyncio.sleep(1.05)
            sweeps = asyncio.gather(*(asyncio.to_thread(store.sweep) for _ in range(4)))
            statuses = await asyncio.gather(*(touch(i % 3) for i in range(12)))
            removed = sum(await sweeps)
            assert set(statuses) <= {200, 404} and statuses[0::3] == [200] * 4, statuses
            assert 404 in statuses and removed <= 1, statuses
            assert not (store.runs_dir / model_id / "checkpoints" / "s1_training").exists()
            assert list(store.tmp_dir.iterdir()) == []

    wire_test(null_server, body)
