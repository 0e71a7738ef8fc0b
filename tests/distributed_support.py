"""Helpers of the multi-process tests: ranks launched the way torchrun launches them (one process
per rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; each its own "node", with its own
working directory when a test gives one), a local Hub endpoint (``HF_ENDPOINT``) whose commit
can be made slow, and ``sitecustomize`` files that simulate what a CPU machine cannot produce
(a slow network share on one node, a reader defect on one file)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra) -> dict[str, str]:
    """The environment of a CPU rank: one thread, offline, this checkout first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def with_sitecustomize(env: dict[str, str], folder: Path, code: str) -> dict[str, str]:
    """``env`` whose Python processes run ``code`` at start-up (a ``sitecustomize`` module in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {**env, "PYTHONPATH": f"{folder}{os.pathsep}{env.get('PYTHONPATH', '')}"}


def run_ranks(args: list[str], env: dict[str, str], world_size: int = 2, cwds: list[Path] | None = None,
              timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``python *args`` as ``world_size`` ranks of one job; ``(exit code, output)`` of each."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, cwd=cwds[rank] if cwds else ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    out = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append((proc.returncode, text))
    return out


class FakeHub:
    """A local stand-in for the Hub's HTTP API (``HF_ENDPOINT``): repo creation, pre-upload (every
    file sent inline) and commits, which take ``commit_seconds``. Keeps the committed files."""

    def __init__(self, commit_seconds: float = 0.0):
        self.commit_seconds, self.files, self.calls = commit_seconds, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._reply({"error": "not part of the fake"}, 404)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    payload = json.loads(data)
                    hub.calls.append(("create_repo", payload))
                    return self._reply({"url": f"{hub.url}/{payload.get('organization')}/{payload.get('name')}"})
                if self.path == "/api/validate-yaml":  # the model card's metadata: YAML, as the Hub checks first
                    try:
                        yaml.safe_load(json.loads(data)["content"].split("\n---\n")[0].removeprefix("---\n"))
                    except yaml.YAMLError as err:
                        return self._reply({"errors": [{"message": str(err)}]}, 400)
                    return self._reply({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(data)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
                if "/commit/" in self.path:
                    started = time.time()
                    time.sleep(hub.commit_seconds)
                    for line in data.decode().splitlines():
                        item = json.loads(line) if line.strip() else {}
                        if item.get("key") == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.calls.append(("commit", self.path, started, time.time()))
                    repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
                    return self._reply({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                return self._reply({"error": "not part of the fake"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fidelity_rank(rank: int, world: int, store: str, logits, scores, result: str) -> None:
    """One rank of test_training_cluster's fidelity test (spawned: kept in this light module)."""
    import torch

    from qalign_kvq.training.trainer import global_fidelity_rank_loss

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mine = logits[rank::world].clone().requires_grad_(True)  # uneven shares: 3 clips and 2
    loss = global_fidelity_rank_loss(mine, scores[rank::world])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{result}.{rank}")
    torch.distributed.destroy_process_group()
