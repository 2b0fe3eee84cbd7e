"""A headless Chromium driven over the DevTools protocol, for the browser tests: no Selenium or Playwright (their
browser downloads do not work offline). The browser is `infra/chromium.sh`'s, which `make test` installs."""
from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("MEDPLIB_CHROMIUM", ROOT / ".venv" / "chromium"))
ARTIFACTS = ROOT / "test-artifacts"  # screenshots the browser tests keep (git-ignored)


class Browser:
    """One headless Chromium with one page; `evaluate` runs JavaScript in it, `click`/`drag` send mouse events."""

    def __init__(self, width: int = 1100, height: int = 900):
        exe = CHROMIUM / "chromium"
        if not exe.is_file():
            raise FileNotFoundError(f"No Chromium at {exe}: run `bash infra/chromium.sh` (make test does)")
        self._profile = tempfile.TemporaryDirectory(prefix="medplib-chromium-")
        # a locale JavaScript knows: under LANG=C.UTF-8 Chromium's is "en-US@posix", on which Intl throws (MLflow's UI
        # then shows "Something went wrong")
        env = {**os.environ, "LD_LIBRARY_PATH": f"{CHROMIUM / 'lib'}:{CHROMIUM}", "FONTCONFIG_PATH": str(CHROMIUM),
               "LANG": "en_US.UTF-8", "LANGUAGE": "en_US", "LC_ALL": "en_US.UTF-8"}
        self.proc = subprocess.Popen(
            [str(exe), "--headless=shell", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
             "--single-process", "--no-zygote",  # its zygote cannot start renderers outside AWS Lambda's sandbox
             "--lang=en-US",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--window-size={width},{height}",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not open its DevTools port (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        call = next(self._ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == call:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, js: str):
        out = self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"JavaScript failed: {out['exceptionDetails'].get('exception', {}).get('description')}")
        return out["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def wait_for(self, js: str, timeout: float = 60.0):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(js)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"Still false after {timeout:.0f} s: {js}")
            time.sleep(0.2)

    def drag(self, x1: float, y1: float, x2: float, y2: float, steps: int = 5) -> None:
        """Press at (x1, y1), move to (x2, y2), release: page coordinates."""
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x1, y=y1, button="left", clickCount=1)
        for i in range(1, steps + 1):
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x1 + (x2 - x1) * i / steps,
                      y=y1 + (y2 - y1) * i / steps, button="left")
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x2, y=y2, button="left", clickCount=1)

    def click(self, selector: str) -> None:
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.drag(box[0], box[1], box[0], box[1], steps=1)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
