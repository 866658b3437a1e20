import os
import sys

# Offline by default: nothing in the suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (read when the kernels
# module is first imported, so it is set before any test imports it).
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py, tests/tiny.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))  # tiny_assets.py


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    """The tiny character-level tokenizer (tests/tiny.py) shared by the trainer tests."""
    from tiny import make_tokenizer

    return make_tokenizer()
