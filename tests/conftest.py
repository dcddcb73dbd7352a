import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests never reach a hub, exactly like the tool in use.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# The pipelines here deploy models named tiny-tutor and the like: on a machine with Ollama they would land in the
# person's Ollama (or fail when its server is not running). TUTOR_WRAP_OLLAMA=ollama includes it on purpose.
os.environ.setdefault("TUTOR_WRAP_OLLAMA", "off")
# The pipelines here train on the CPU: they hide CUDA GPUs with CUDA_VISIBLE_DEVICES="" where they start a run; the
# HIP runtime reads that as unset, so ROCm GPUs are hidden for the whole session with an invalid index.
os.environ["HIP_VISIBLE_DEVICES"] = "-1"
# What the tests' merges measure is kept apart from the person's own calibration store (planning/calibration.py).
if "TUTOR_WRAP_CALIBRATION" not in os.environ:
    import tempfile

    os.environ["TUTOR_WRAP_CALIBRATION"] = str(Path(tempfile.mkdtemp(prefix="tutor-wrap-calibration-")) / "store.json")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """The tiny Llama with ChatML tokens, <|im_end|> as EOS and a SmolLM2-shaped chat template (tiny_model.py)."""
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat-llama", chat=True)


# Lanes: every test module declares one (pytestmark); a test that runs the CLI through several stages may move
# itself to e2e with its own mark (the closest mark is its lane, and `-m "not e2e"` leaves it out). `make test-fast`
# runs unit + tools (no training, under 3 minutes on 2 cores); `make test` and CI run all three.
LANES = ("unit", "tools", "e2e")


def _marks(module) -> list:
    marks = getattr(module, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


def pytest_collection_modifyitems(config, items):
    unlaned = sorted({item.nodeid.split("::")[0] for item in items
                      if not any(item.get_closest_marker(lane) for lane in LANES)})
    module_level = sorted({item.nodeid.split("::")[0] for item in items if sum(1 for m in _marks(item.module)
                                                                                if m.name in LANES) > 1})
    if unlaned or module_level:
        raise pytest.UsageError(f"test modules without exactly one lane mark ({', '.join(LANES)}): "
                                f"{', '.join(unlaned + module_level)}; add `pytestmark = pytest.mark.<lane>` to the module")


# A real 2 MB tmpfs, for the tests of a disk that is too small (test_disk_full.py, test_hub.py).
@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:   # root in a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
