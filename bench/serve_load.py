"""Load on `python infer.py --serve`: requests/s and latency at 1, 4 and 16 concurrent clients.

  python -m bench.serve_load                          # tiny networks made here (two members)
  python -m bench.serve_load --weights fold0/model.safetensors --weights ...   # real ones
  python -m bench.serve_load --requests 50 --out serve.json

Prints one JSON object and writes it (default bench/results/serve_load_<machine>.json). The
server runs in its own process on a free loopback port, exactly as a user starts it; the
clients are one asyncio process (httpx), each client sending its next request when the last
is answered, all clients together sending `--requests` uploads of one JPEG photograph
(scikit-image's astronaut, 512 px; nothing is downloaded) per level, after a few untimed
ones. Latency is the client's wall time per request; `mean_batch` is how many uploads the
server scored per call in that level (from /health). Clients and server share the machine's
cores, and on a shared machine other processes take some too: `others_cpu_share` says how much
of the machine's CPU time they took during each level (from /proc/stat), so noisy figures can
be told apart. Traffic goes to 127.0.0.1 only, and every level is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from skimage import data as skdata

from core.io import write_json

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)
WARMUP = 8
LEVEL_TIMEOUT_S = 300
SHARED_ABOVE = 0.1
TINY = {"model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": 32}}


def tiny_members(root: Path) -> list[Path]:
    """Two members of one fold each, random weights, in this project's checkpoint format."""
    from core.checkpoint import save_weights  # torch: only for the tiny networks
    from models import build_model

    weights = []
    for member in ("tiny_a", "tiny_b"):
        folder = root / member / "fold0"
        weights.append(save_weights(build_model(TINY["model"]).state_dict(), folder / "model.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"complete": True, "config": {"name": member, **TINY}}))
    return weights


def photo_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_seconds() -> float:
    """CPU time all processes on the machine have used (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(weights: list[Path], port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "infer.py", "--serve", "--port", str(port), "--device", args.device]
    cmd += [a for w in weights for a in ("--weights", str(w))]
    # Its own outputs folder: a blend fitted in the checkout's outputs/ is not for these networks.
    cmd += ["--outputs", str(log.parent)]
    cmd += ["--batch-window-ms", str(args.batch_window_ms)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # a first run exports the networks to ONNX
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"server not ready: {log.read_text()[-2000:]}")


async def one_level(url: str, photo: bytes, clients: int, requests: int) -> list[float]:
    """Latency of each of `requests` uploads sent by `clients` concurrent clients."""
    latencies: list[float] = []
    left = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for _ in left:
            start = time.perf_counter()
            r = await http.post("/predict", files={"file": ("astronaut.jpg", photo)})
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), LEVEL_TIMEOUT_S)
    return latencies


def measure(url: str, photo: bytes, clients: int, requests: int, server_pid: int) -> dict:
    before = httpx.get(f"{url}/health").json()
    busy0, own0, srv0 = busy_seconds(), time.process_time(), process_seconds(server_pid)
    start = time.perf_counter()
    latencies = asyncio.run(one_level(url, photo, clients, requests))
    wall = time.perf_counter() - start
    ours = time.process_time() - own0 + process_seconds(server_pid) - srv0
    others = max(0.0, busy_seconds() - busy0 - ours) / (wall * (os.cpu_count() or 1))
    after = httpx.get(f"{url}/health").json()
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "mean_batch": round((after["scored"] - before["scored"]) / max(1, after["batches"] - before["batches"]), 2),
        "others_cpu_share": round(others, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", action="append", help="model.safetensors to serve (default: two tiny members)")
    p.add_argument("--requests", type=int, default=200, help="uploads per level (default: %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=list(LEVELS), help="levels (default: 1 4 16)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="the server's (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="the server's --batch-size (default: infer.py's)")
    p.add_argument("--device", default="cpu", help="the server's --device (default: %(default)s)")
    p.add_argument("--out", help="default: bench/results/serve_load_<machine>.json")
    return p.parse_args(argv)


def machine_name(device: str, result: dict) -> str:
    shared = "_shared" if result["machine"]["shared"] else ""
    return f"{'cpu' if device == 'cpu' else 'gpu'}_{os.cpu_count()}core{shared}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photo = photo_jpeg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        weights = [Path(w) for w in args.weights] if args.weights else tiny_members(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(weights, port, args, Path(tmp) / "server.log")
        try:
            asyncio.run(one_level(url, photo, 1, WARMUP))
            levels = [measure(url, photo, c, args.requests, server.pid) for c in args.clients]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    result = {
        "models": "two tiny members (test_resnet, 32 px, random weights)" if not args.weights else args.weights,
        "image": f"astronaut JPEG, 512x512, {len(photo)} bytes",
        "server": {"device": args.device, "batch_window_ms": args.batch_window_ms, "batch_size": args.batch_size},
        "levels": levels,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "shared": max(level["others_cpu_share"] for level in levels) > SHARED_ABOVE,
        },
        "latency": "client wall time per request, loopback; p50/p95 over the level's requests",
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"serve_load_{machine_name(args.device, result)}.json")
    write_json(result, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
