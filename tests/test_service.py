"""`python infer.py --serve`: a real server on a free port, spoken to over HTTP. It scores as
`infer.py --json` does, refuses bad and oversized uploads with the reason and goes on serving,
batches concurrent requests, and stops cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from starlette.testclient import TestClient

import infer
import models
from core.checkpoint import save_weights
from core.infer.service import MicroBatcher, ServedModel, build_app
from tests.test_infer_video import write_video

SIZE = 32
LIMIT_MB = 0.25
# Long enough that requests sent together on a busy 2-core machine fall into one batch.
WINDOW_MS = 100


def member_fold(root: Path, member: str) -> Path:
    cfg = {"name": member, "model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": SIZE}}
    folder = root / member / "fold0"
    weights = save_weights(models.build_model(cfg["model"]).state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return weights


def clip_member_fold(root: Path) -> Path:
    """sta_demo's clip network with random weights (nudged: its zero-initialised adapters and head
    would score every clip 0.5)."""
    import torch
    import yaml

    cfg = yaml.safe_load(Path("configs/members/sta_demo.yaml").read_text())
    torch.manual_seed(0)
    model = models.build_model(cfg["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = root / cfg["name"] / "fold0"
    weights = save_weights(model.state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return weights


def infer_json(args: list[str]) -> dict[str, dict]:
    """`infer.py --json` run in this process: its object per path."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert infer.main([*args, "--json"]) == 0
    return {row["path"]: row for row in map(json.loads, out.getvalue().splitlines())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """Two tiny image members and a clip member exported to ONNX (by a first infer.py run), four
    images, a video with a face, and what `infer.py --json` says of each."""
    root = tmp_path_factory.mktemp("serve")
    weights = [member_fold(root, "alpha"), member_fold(root, "beta"), clip_member_fold(root)]
    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        images.append(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 40, 3), dtype=np.uint8)).save(images[-1])
    face = skdata.astronaut()[:256, 96:352]
    video = write_video(root / "clip.avi", [np.roll(face, 3 * i, axis=1) for i in range(10)])
    weight_args = [a for w in weights for a in ("--weights", str(w))]
    common = [*weight_args, "--device", "cpu", "--frames", "2"]
    expected = infer_json([*map(str, images), str(video), *common])
    return {"root": root, "images": images, "video": video, "args": common, "expected": expected}


class Server:
    """`python infer.py --serve` in a subprocess, its log in a file and its temporary files in a
    folder of their own."""

    def __init__(self, project: dict, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = folder / "server-tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"server-{self.port}.log"
        cmd = [sys.executable, "infer.py", "--serve", "--port", str(self.port), *project["args"]]
        cmd += ["--max-upload-mb", str(LIMIT_MB), "--batch-window-ms", str(WINDOW_MS)]
        with open(self.log, "w") as log:
            env = {**os.environ, "TMPDIR": str(self.tmp)}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-2000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server(project, tmp_path_factory) -> Iterator[Server]:
    running = Server(project, tmp_path_factory.mktemp("server"))
    yield running
    if running.proc.poll() is None:
        running.stop()


def post(url: str, name: str, content: bytes, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, content)}, timeout=60, **kwargs)


def assert_scored_as_infer(answer: dict, expected: dict) -> None:
    assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert answer["members"].keys() == expected["members"].keys() == {"alpha", "beta", "sta_demo"}
    for member, p in expected["members"].items():
        assert answer["members"][member] == pytest.approx(p, abs=1e-6)
    assert answer["members"]["sta_demo"] != pytest.approx(0.5, abs=1e-4)  # the clip member really scored it


def test_an_image_scores_as_infer_json(server, project):
    image = project["images"][0]
    r = post(server.url, image.name, image.read_bytes())
    assert r.status_code == 200
    answer = r.json()
    assert_scored_as_infer(answer, project["expected"][str(image)])
    assert answer["name"] == image.name and answer["kind"] == "image"
    assert 0 < answer["seconds"] < 60 and answer["batch_size"] >= 1


def test_health_says_what_is_served(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["columns"] == ["blend", "alpha", "beta", "sta_demo"]
    assert health["max_upload_mb"] == LIMIT_MB


def test_bad_uploads_get_the_reason_and_the_service_goes_on(server, project):
    png = project["images"][1].read_bytes()
    cases = {
        "notes.jpg": (b"this is not a picture", 400, "notes.jpg: not an image or unsupported format"),
        "cut.png": (png[: len(png) // 2], 400, "cut.png: "),
        "empty.png": (b"", 400, "empty.png: empty file"),
        "clip.mp4": (b"\x00\x00\x00\x18ftypmp42 not really", 400, "clip.mp4: "),
    }
    for name, (content, status, reason) in cases.items():
        r = post(server.url, name, content)
        assert (r.status_code, r.json()["error"][: len(reason)]) == (status, reason), name
    typed_video = httpx.post(f"{server.url}/predict", files={"file": ("noname", b"junk", "video/mp4")})
    assert typed_video.status_code == 400 and typed_video.json()["error"] == "noname: cannot open as a video"
    not_a_form = httpx.post(f"{server.url}/predict", content=png, headers={"content-type": "image/png"})
    assert not_a_form.status_code == 400 and "multipart/form-data" in not_a_form.json()["error"]
    wrong_field = httpx.post(f"{server.url}/predict", files={"image": ("a.png", png)})
    assert wrong_field.status_code == 400 and wrong_field.json()["error"] == "no file in the form field 'file'"
    again = post(server.url, "again.png", png)
    assert again.status_code == 200
    assert_scored_as_infer(again.json(), project["expected"][str(project["images"][1])])


def test_oversized_uploads_get_413_whether_declared_or_streamed(server, project):
    big = np.random.default_rng(1).bytes(int(2 * LIMIT_MB * 2**20))
    declared = post(server.url, "big.png", big)
    assert declared.status_code == 413
    assert declared.json()["error"] == f"upload larger than the limit of {LIMIT_MB:g} MB"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while the body arrives
        yield b'--cut\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for start in range(0, len(big), 2**16):
            yield big[start : start + 2**16]
        yield b"\r\n--cut--\r\n"

    streamed = httpx.post(
        f"{server.url}/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=cut"}
    )
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert streamed.status_code == 413
    image = project["images"][2]
    assert post(server.url, image.name, image.read_bytes()).status_code == 200


def test_concurrent_requests_are_batched_and_each_gets_its_own_score(server, project):
    images = [project["images"][i % 4] for i in range(16)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            sends = [client.post("/predict", files={"file": (p.name, p.read_bytes())}) for p in images]
            return await asyncio.gather(*sends)

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 16
    for image, r in zip(images, responses, strict=True):
        assert_scored_as_infer(r.json(), project["expected"][str(image)])
    assert max(r.json()["batch_size"] for r in responses) > 1
    assert httpx.get(f"{server.url}/health").json()["largest_batch"] > 1


def test_a_video_is_scored_as_infer_json_and_its_temporary_file_removed(server, project):
    video = project["video"]
    r = post(server.url, video.name, video.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "video"
    assert_scored_as_infer(r.json(), project["expected"][str(video)])
    assert list(server.tmp.glob("infer-serve-*")) == []


def test_the_page_has_an_upload_form(server):
    r = httpx.get(server.url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'action="/predict"' in r.text and 'name="file"' in r.text and 'id="probability"' in r.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_service_cleanly(project, tmp_path, sig):
    running = Server(project, tmp_path)
    image = project["images"][3]
    assert post(running.url, image.name, image.read_bytes()).status_code == 200
    assert running.stop(sig) == 0
    log = running.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log
    assert port_is_free(running.port)


def test_serve_takes_no_inputs_and_scoring_still_needs_them(capsys):
    with pytest.raises(SystemExit) as no_inputs:
        infer.parse_args([])
    assert no_inputs.value.code == 2
    assert "the following arguments are required: inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.parse_args(["--serve", "a.png"])
    assert "--serve takes no inputs" in capsys.readouterr().err
    assert infer.parse_args(["--serve"]).inputs == []


def test_serve_with_a_recipe_unknown_here_is_one_error_line_not_a_traceback(tmp_path, capsys):
    weights = member_fold(tmp_path, "odd")
    meta = json.loads((weights.parent / "meta.json").read_text())
    meta["config"]["data"]["resize"] = "cubic"
    (weights.parent / "meta.json").write_text(json.dumps(meta))
    assert infer.main(["--serve", "--weights", str(weights), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: data.resize 'cubic': expected one of ('area', 'linear', 'bilinear_antialias')"
    ]


def test_scoring_files_imports_no_web_framework(project):
    probe = (
        "import sys, infer; rc = infer.main(sys.argv[1:]); "
        "print(rc, [m for m in ('starlette', 'uvicorn', 'multipart', 'core.infer.service') if m in sys.modules])"
    )
    cmd = [sys.executable, "-c", probe, str(project["images"][0]), *project["args"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver (Debian packages chromium and chromium-driver)",
)
def test_the_page_scores_a_demo_photograph_in_a_browser(server, project, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=95)
    expected = infer_json([str(photo), *project["args"]])[str(photo)]["probability"]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.get(server.url)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        browser.find_element(By.ID, "submit").click()
        shown = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "probability").text)
        members = browser.find_element(By.ID, "members").text
    finally:
        browser.quit()
    assert float(shown) == pytest.approx(expected, abs=5e-5)
    assert "alpha" in members and "beta" in members


# In-process checks of the service's parts, with a stand-in model: a dark image makes it fail.


def stand_in(images: list[np.ndarray]) -> np.ndarray:
    if any(image.mean() < 10 for image in images):
        raise ValueError("cannot score a dark image")
    return np.array([[image.mean() / 255, image.mean() / 255] for image in images])


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_batch_that_fails_is_scored_again_one_by_one():
    async def scenario() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(stand_in, pool, window_s=0.2, max_batch=8)
            worker = asyncio.create_task(batcher.run())
            images = [np.full((4, 4, 3), v, np.uint8) for v in (51, 0, 102)]
            results = await asyncio.gather(*map(batcher.submit, images), return_exceptions=True)
            worker.cancel()
            return [results, batcher.stats]

    (bright, dark, brighter), stats = asyncio.run(scenario())
    assert isinstance(dark, ValueError)
    assert bright[0][0] == pytest.approx(0.2) and brighter[0][0] == pytest.approx(0.4)
    assert bright[1] == brighter[1] == 1  # scored alone, after the batch of three failed
    assert (stats.scored, stats.batches) == (2, 2)


def test_a_scoring_error_is_a_json_500_and_the_next_request_is_served():
    model = ServedModel(["blend", "one"], stand_in, lambda name, frames: None, lambda path: None, crop_faces=False)
    with TestClient(build_app(model, 2**20, 0.001), raise_server_exceptions=False) as client:
        failed = client.post("/predict", files={"file": ("dark.png", png(0))})
        assert failed.status_code == 500 and "cannot score a dark image" in failed.json()["error"]
        served = client.post("/predict", files={"file": ("grey.png", png(51))})
        assert served.status_code == 200 and served.json()["probability"] == pytest.approx(0.2)


def test_a_face_cropped_input_without_a_face_is_422():
    model = ServedModel(["blend", "one"], stand_in, lambda name, frames: None, lambda path: None, crop_faces=True)
    with TestClient(build_app(model, 2**20, 0.001)) as client:
        r = client.post("/predict", files={"file": ("wall.png", png(90))})
    assert r.status_code == 422 and r.json()["error"] == "wall.png: no face found in 1 frame(s)"
