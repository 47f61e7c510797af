import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def _glue_dir() -> Path | None:
    env = os.environ.get("FINEGATES_GLUE_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "glue"]:
        if (cand / "manifest.json").is_file():
            return cand.resolve()
    return None


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    d = _glue_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("CI must point FINEGATES_GLUE_DIR at the local GLUE copy")
        pytest.skip("no local GLUE copy: set FINEGATES_GLUE_DIR")
    return d


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from finegates.train import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory):
    """Teachers trained by tests go to a temporary cache, never to the user's ~/.cache."""
    d = tmp_path_factory.mktemp("teachers")
    old = os.environ.get("FINEGATES_TEACHER_CACHE")
    os.environ["FINEGATES_TEACHER_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("FINEGATES_TEACHER_CACHE", None)
    else:
        os.environ["FINEGATES_TEACHER_CACHE"] = old
