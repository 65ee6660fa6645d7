"""Client test helpers: coroutines on asyncio or uvloop (loop errors fail the test), data, clients, a slow
sampling engine with a server-side count of the samples in flight, and the built-in model (or a checkpoint
folder) loaded by plain transformers, the reference that server numbers are checked against."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from hpcai_async import ServiceClient, types
from hpcai_async._loop import LoopThread
from hpcai_async.server import NullEngine
from hpcai_async.server.engine_api import SampleJob

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dev dependency
    uvloop = None

LOOPS = ["asyncio", "uvloop"] if uvloop is not None else ["asyncio"]

# The loop kind ``run`` uses when the test names none: set per test by conftest's ``_loop_kind`` fixture,
# which runs the cheap async client tests once on each of LOOPS.
default_loop = "asyncio"

# The capabilities of a server that speaks only the official protocol (the hosted service): injected through
# the fault proxy, they make the client fall back to turn-taking, JSON and no extension fields.
PLAIN_CAPABILITIES = b'{"supported_models": [{"model_name": "null/instant"}]}'
# Our server's extensions less "inline_result": every result is then fetched with retrieve_future.
POLLING_CAPABILITIES = (
    b'{"supported_models": [{"model_name": "null/instant"}], '
    b'"features": ["seq_id", "msgpack", "long_poll", "load_optimizer"]}'
)


def without_inline_results(proxy: Any) -> None:
    """Make a client behind ``proxy`` poll for every result, so faults injected on retrieve_future apply."""
    proxy.inject("get_server_capabilities", "status", status=200, body=POLLING_CAPABILITIES)


class HasURL(Protocol):
    url: str
    api_key: str


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str | None = None, timeout: float = 60.0) -> T:
    """Run ``main()`` on a fresh loop of the given kind (default: the test's, see ``default_loop``); fail if
    the loop reported an unhandled error."""
    loop = loop or default_loop
    factory = uvloop.new_event_loop if loop == "uvloop" and uvloop is not None else asyncio.new_event_loop
    errors: list[dict[str, Any]] = []

    async def body() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        try:
            return await asyncio.wait_for(main(), timeout)
        finally:
            gc.collect()  # "Task exception was never retrieved" and "Unclosed client session" show up now
            await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(body())
    assert not errors, f"unhandled errors in the event loop: {errors}"
    return result


def foreign_loop(name: str = "test-foreign-loop") -> LoopThread:
    """A loop of its own in another thread (a notebook's, say): ``with foreign_loop() as loop``."""
    return LoopThread(name)


def client(server: HasURL, **options: Any) -> ServiceClient:
    """A ServiceClient for ``server`` (``base_url=`` points it elsewhere, e.g. at a proxy in front of it)."""
    options.setdefault("base_url", server.url)
    return ServiceClient(api_key=server.api_key, **options)


def datum(tokens: Any, weights: Any = None) -> types.Datum:
    """A cross-entropy datum for the token sequence ``tokens`` (inputs tokens[:-1], targets tokens[1:])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": w},
    )


def small_batch(count: int = 1, length: int = 6, offset: int = 1) -> list[types.Datum]:
    return [datum(np.arange(length) + offset + i) for i in range(count)]


class SlowSampler(NullEngine):
    """A NullEngine whose sampling batches take ``delay`` seconds (a busy device); it records how many jobs
    each batch held."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.batches: list[int] = []

    def sample(self, jobs: Sequence[SampleJob]) -> list[types.SampleResponse]:
        self.batches.append(len(jobs))
        time.sleep(self.delay)
        return super().sample(jobs)


class InFlight:
    """Counts a server's sampling requests from accepted to their result handed out (server-side): wraps
    its scheduler's ``submit_sample`` and ``delivered`` (the real ones still run)."""

    def __init__(self, server: Any) -> None:
        scheduler = server.scheduler
        self.now = self.peak = self.submitted = 0
        self._mine: set[int] = set()
        submit, delivered = scheduler.submit_sample, scheduler.delivered

        def counting_submit(job: SampleJob, **kwargs: Any) -> Any:
            record = submit(job, **kwargs)
            self.submitted += 1
            self._mine.add(id(record))
            self.now += 1
            self.peak = max(self.peak, self.now)
            return record

        def counting_delivered(record: Any) -> None:
            if id(record) in self._mine:  # its first hand-out
                self._mine.discard(id(record))
                self.now -= 1
            delivered(record)

        scheduler.submit_sample, scheduler.delivered = counting_submit, counting_delivered


def hf_model(folder: Any = None, *, frozen: bool = True) -> Any:
    """The model in ``folder`` (default: the built-in one) by plain transformers, as a user would load it:
    float32, eval mode, and (``frozen``) without gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpcai_async.server.models import BUILTIN_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(folder or BUILTIN_DIR), dtype=torch.float32)
    return model.eval().requires_grad_(not frozen)


def hf_tokenizer() -> Any:
    """The built-in model's tokenizer by plain transformers."""
    from transformers import AutoTokenizer

    from hpcai_async.server.models import BUILTIN_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(BUILTIN_DIR))
