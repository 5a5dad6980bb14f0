"""GPU checks: every test here needs CUDA and is skipped cleanly without it (CI has no GPU).
Run them all, with the GPU benchmarks, by ``bash tests/gpu/run.sh``."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (a GPU machine); CI has none")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
