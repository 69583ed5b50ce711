import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is one process on a shared core: one intra-op thread each,
# or two workers with two threads apiece oversubscribe a 2-core machine and spin.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: exhaustive sweeps and long end-to-end runs; CI runs them in a second step "
        "(`pytest -m slow`), the default run leaves them out")


def covering(*axes):
    """The cross product of ``axes`` as pytest params, the default run keeping a covering subset:
    each value of the first two axes meets every other, and every value of each axis appears; the
    rest of the product is marked slow (CI's second step runs it). The rule is fixed (index sum
    modulo the last axis's length), so the subset does not change from run to run."""
    import itertools

    def label(v):
        return v if isinstance(v, str) else ("none" if v is None else str(v))

    out = []
    for idx in itertools.product(*(range(len(a)) for a in axes)):
        values = tuple(a[i] for a, i in zip(axes, idx))
        marks = () if sum(idx) % len(axes[-1]) == 0 else (pytest.mark.slow,)
        out.append(pytest.param(*values, marks=marks, id="-".join(label(v) for v in values)))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead, and spin badly when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
