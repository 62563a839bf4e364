import os
import sys
from pathlib import Path

# OpenMP's default spin-waiting makes threads fight on a busy 2-core machine (measured 7x slower);
# must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
ORACLE = REFERENCE / "oracle"
DATA = SHARED / "data"
DEMO_MODEL = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def demo_model_dir():
    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.skip("demo model not built: run `python scripts/build_demo_model.py`")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def oracle_dir():
    if not ORACLE.is_dir():
        pytest.skip("../shared/reference/oracle not present")
    return ORACLE
