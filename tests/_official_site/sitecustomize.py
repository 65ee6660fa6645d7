"""Test harness for the official programs (on PYTHONPATH in their subprocesses only), two set-up steps:

* ``HPCAI_TEST_APPEND_SITE``: the official SDK's site-packages, put *after* ours on ``sys.path`` -- the
  official package installed beside hpcai_async, as a user would have it; our packages win where both have
  one, and the cookbook's own dependencies (chz, datasets, transformers) come from there.
* ``HPCAI_TEST_DATASETS``: ``{"hub/name": {"train": "file.jsonl", ...}}``: ``datasets.load_dataset`` of
  those hub names reads the test's local files instead (nothing is downloaded; other names are untouched).
"""

import json
import os
import sys

if os.environ.get("HPCAI_TEST_APPEND_SITE"):
    sys.path.append(os.environ["HPCAI_TEST_APPEND_SITE"])

if os.environ.get("HPCAI_TEST_DATASETS"):
    import datasets

    _LOCAL = json.loads(os.environ["HPCAI_TEST_DATASETS"])
    _hub_load_dataset = datasets.load_dataset

    def _load_dataset(path, *args, split=None, **kwargs):  # type: ignore[no-untyped-def]
        if path not in _LOCAL:
            return _hub_load_dataset(path, *args, split=split, **kwargs)
        return _hub_load_dataset("json", data_files=_LOCAL[path], split=split)

    datasets.load_dataset = _load_dataset
