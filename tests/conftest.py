import os, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent/'shared'
FERPLUS = SHARED/'data'/'ferplus'
YUNET = SHARED/'models'/'face_detection_yunet.onnx'
BIN = Path(sys.executable).parent

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('YOLO_OFFLINE', '1')


@pytest.fixture
def ferplus_root():
    if not (FERPLUS/'FER2013Train'/'label.csv').exists(): pytest.skip(f'real FERPlus not found at {FERPLUS}')
    return FERPLUS


@pytest.fixture
def yunet_path():
    if not YUNET.exists(): pytest.skip(f'YuNet model not found at {YUNET}')
    return YUNET
