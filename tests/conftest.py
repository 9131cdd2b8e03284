import logging, os
import pytest
import lightning.pytorch  # noqa: F401  (its import sets its loggers' levels: quieten them after it)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"): logging.getLogger(_name).setLevel(logging.ERROR)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:.*does not have many workers")  # loading in-process is the CPU default
    config.addinivalue_line("filterwarnings", "ignore:.*LeafSpec.*")  # a deprecation inside Lightning itself
    config.addinivalue_line("filterwarnings", "ignore:Total length of `list` across ranks is zero")  # runs without validation data


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    "A small shapes world (seed 0): split name -> JSONL path."
    from vlwb.shapes import generate_shapes_world
    return generate_shapes_world(tmp_path_factory.mktemp("world"), n_train=48, n_val=8, n_test=30, seed=0, progress=False)
