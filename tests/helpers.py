"""Helpers shared by the tests: tiny trainers on the tiny random pipeline, and scripts imported as modules."""

import importlib.util
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.testing_utils import tiny_pipeline


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red fox jumps", "a cat runs on the beach", "a dog in snow", "a blue car at night"]
LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def redness(prompts, videos, **kwargs):
    """How much red dominates each video `[N, F, C, H, W]` (not bounded)."""
    return (videos[:, :, 0] - videos[:, :, 1:].mean(dim=2)).mean(dim=(1, 2, 3)).tolist()


def tiny_args(output_dir, **kwargs) -> ARCoPOConfig:
    """A CPU config for the tiny pipeline: 2 steps of 2 prompts x G = 3, 3 denoising steps, no saving."""
    defaults = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=3,
        num_anchors=2,
        denoising_sigmas=[1.0, 0.75, 0.5],
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    return ARCoPOConfig(**{**defaults, **kwargs})


def tiny_trainer(
    output_dir, pipe=None, reward_funcs=(redness,), prompts=PROMPTS, dataset=None, peft_config=None,
    cls=ARCoPOTrainer, **kwargs,
) -> ARCoPOTrainer:  # fmt: skip
    """An `ARCoPOTrainer` (or `cls`) on the tiny pipeline with a rank-4 LoRA; `kwargs` override `tiny_args`."""
    return cls(
        pipeline=pipe or tiny_pipeline(),
        reward_funcs=list(reward_funcs),
        args=tiny_args(output_dir, **kwargs),
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": list(prompts)}),
        peft_config=peft_config or LoraConfig(**LORA),
    )


class StopAt(TrainerCallback):
    """Stops training after optimizer step `step` (a run interrupted right after its checkpoint there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def load_script(path: str):
    """
    A script that is not part of the package (`examples/...py`, `benchmarks/...py`) imported as a module. It is
    registered in `sys.modules` under `_script_<name>` while it runs, as an import would, so that its dataclasses can
    resolve their annotations.
    """
    name = "_script_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class FakeServer(ThreadingHTTPServer):
    """
    A test HTTP server on 127.0.0.1 that answers every request with `respond(server, path, body) -> (status, bytes) |
    (status, bytes, headers) | None`; `None` closes the connection without a reply (a server dying mid-request).
    Records the requests (path, body, lower-case headers, arrival time) and the most requests in flight at once.
    """

    daemon_threads = True

    def __init__(self, respond):
        self.respond, self.requests, self.in_flight, self.max_in_flight = respond, [], 0, 0
        self.lock, self.release = threading.Lock(), threading.Event()
        super().__init__(("127.0.0.1", 0), FakeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._handle(b"")

    def do_POST(self):
        self._handle(self.rfile.read(int(self.headers["Content-Length"])))

    def _handle(self, body):
        server = self.server
        with server.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            server.requests.append({"path": self.path, "body": body, "headers": headers, "time": time.monotonic()})
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            out = server.respond(server, self.path, body)
        finally:
            with server.lock:
                server.in_flight -= 1
        if out is None:
            self.close_connection = True
            return
        status, payload, headers = out if len(out) == 3 else (*out, {})
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass
