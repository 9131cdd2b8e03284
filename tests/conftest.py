import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vlwb.train import quiet_lightning  # noqa: E402

quiet_lightning()


def pytest_configure(config):
    # pytest resets warning filters for every test: repeat quiet_lightning's as ini lines
    for pattern in ("does not have many workers", "LeafSpec", "Total length of `list` across ranks is zero",
                    "train_dataloader yielded None"):
        config.addinivalue_line("filterwarnings", f"ignore:.*{pattern}")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    "A small shapes world (seed 0): split name -> JSONL path."
    from vlwb.shapes import generate_shapes_world
    return generate_shapes_world(tmp_path_factory.mktemp("world"), n_train=48, n_val=8, n_test=30, seed=0, progress=False)
