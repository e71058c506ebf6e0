import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip without a GPU, unless SPARK_DET_CUDA_TESTS_DEVICE names the CPU
    (benchmarks/gpu_check.py's dry run); tests/test_cuda.py reads the same variable."""
    import os

    import torch

    if os.environ.get("SPARK_DET_CUDA_TESTS_DEVICE", "cuda") != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def pytest_report_header(config):
    from spark_det.env import collect_env, format_env

    return ["spark-det environment:", *format_env(collect_env()).splitlines()]


@pytest.fixture(scope="session", autouse=True)
def _private_index_cache(tmp_path_factory):
    """Data indexes (spark_det.data.index) go to a folder of this test session, not ~/.cache;
    subprocesses (the CLI, torchrun) inherit it."""
    import os

    os.environ["SPARK_DET_CACHE"] = str(tmp_path_factory.mktemp("spark_det_cache"))
    yield


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def unlabeled_images(tmp_path_factory):
    """``unlabeled_images(count, size=64)``: a folder of ``count`` synthetic unlabeled images
    (seed 0), made once per session and shared by every module asking for the same one; tests
    only read it (a test that changes images copies the folder first)."""
    from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images

    made = {}

    def folder(count: int, size: int = 64) -> Path:
        if (count, size) not in made:
            made[count, size] = write_unlabeled_images(tmp_path_factory.mktemp(f"unlabeled-{count}x{size}px"), count,
                                                       seed=0, cfg=SceneConfig(image_size=(size, size)))
        return made[count, size]

    return folder


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """4 train / 2 val synthetic 128 px images in COCO format, shared by the framework tests."""
    from spark_det.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tiny_coco"), 4, 2, 0, (128, 128), seed=0)
