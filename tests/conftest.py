"""
Shared pytest fixtures.

- `data_dir`: the local dataset mirror from $NANOCHAT_DATA_DIR; tests that need it skip (with the reason)
  when it is unset.
- `tokenizer`: a tiny RustBPETokenizer (vocab 1024) trained once per session on built-in text plus, when the
  mirror is available, a slice of its pretraining and chat data.
- Tests marked `@pytest.mark.cuda` need a CUDA GPU and are skipped where there is none (and only there):
  `pytest -m cuda` runs them (bench/gpu_proof.sh does, on the GPU machine).
- Every test runs with NANOCHAT_BASE_DIR pointing at a fresh temporary directory, so nothing touches
  ~/.cache/nanochat, and with wandb disabled; the data check's eval index cache is shared by the session.
"""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUILTIN_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Question: What is 12 + 30? Answer: 12 + 30 = 42. #### 42
def add(a, b):
    return a + b
Multiple Choice question: Which planet is largest?
- Jupiter=A
- Mars=B
- Venus=C
- Earth=D
Respond only with the letter of the correct answer. A B C D 1 2 3 4 5
Unicode: café, naïve, 日本語, Привет, emoji 🙂🚀.
"""


@pytest.fixture(scope="session")
def _data_check_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_check_cache"))


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (bash bench/gpu_proof.sh runs these on one)")
        for item in cuda_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch, _data_check_cache):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nanochat_base"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # the eval sets' n-gram indexes (nanochat/data_check.py) are keyed by their content: one cache per session
    monkeypatch.setenv("NANOCHAT_DATA_CHECK_DIR", _data_check_cache)


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one intra-op thread, and far faster when other processes load the 2 cores
    (no thread spinning). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir():
    path = os.environ.get("NANOCHAT_DATA_DIR")
    if not path:
        pytest.skip("NANOCHAT_DATA_DIR is not set: this test needs the local dataset mirror (see README)")
    if not os.path.isdir(path):
        pytest.skip(f"NANOCHAT_DATA_DIR={path} does not exist")
    return path


def _training_texts():
    texts = [_BUILTIN_TEXT] * 20
    path = os.environ.get("NANOCHAT_DATA_DIR")
    if path and os.path.isdir(os.path.join(path, "pretrain")):
        import pyarrow.parquet as pq

        table = pq.read_table(os.path.join(path, "pretrain", "shard_00000.parquet"), columns=["text"])
        texts.extend(t[:5000] for t in table.column("text").to_pylist()[:100])
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    from nanochat.tokenizer import RustBPETokenizer

    return RustBPETokenizer.train_from_iterator(iter(_training_texts()), 1024)
