import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def pipe():
    """The tiny pixel-space pipeline (3 channels, 16x16, 9 frames = 3 chunks of 3). Do not mutate."""
    from trl_arcopo.testing_utils import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture
def start():
    """
    `start(server)` serves a standard-library test server (`socketserver.BaseServer`) from a thread, or takes a reward
    server that already serves (`serve(..., block=False)`); every server is stopped at the end of the test.
    """
    import socketserver
    import threading

    servers = []

    def _start(server):
        if isinstance(server, socketserver.BaseServer):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        getattr(server, "release", threading.Event()).set()  # a test server's hanging handlers may end
        server.shutdown()
        server.server_close()
