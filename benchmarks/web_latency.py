"""Latency of `mobileinst export --format web` in headless Chromium (WASM, 1 and 2 threads) beside
onnxruntime in Python, on the same graph and the same images.

    python benchmarks/web_latency.py --web best_web                 # an existing web export
    python benchmarks/web_latency.py --weights best.pt --imgsz 320  # exports one first (needs make web-deps)
    python benchmarks/web_latency.py --model mobileinst-mobilenetv2 --imgsz 320 --threads 1 2 --runs 10

Per configuration and image: the median over --runs (after one warm-up) of the network alone
(onnxruntime's `session.run`) and end to end (page: decode, letterbox, run, masks cropped and
resized, overlay drawn; Python: `OnnxPredictor.__call__` on a decoded array: prepare, run,
masks cropped and resized, no drawing). The page's numbers are its own `performance.now()`
timings (`window.mobileinst.runOnUrl`), read back over the DevTools protocol.

`Chromium` (below) drives the system browser (Debian's `chromium`) over the DevTools protocol on
a pipe (`--remote-debugging-pipe`: commands in on fd 3, replies out on fd 4, NUL-separated JSON;
https://chromedevtools.github.io/devtools-protocol/), with the standard library only; the web
test (tests/test_web.py) uses it too. No browser is downloaded.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--remote-debugging-pipe", "--no-sandbox", "--no-first-run",
                  "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                  "--disable-component-update", "--disable-dev-shm-usage", "--mute-audio")


def find_chromium() -> str | None:
    """The system Chromium (Debian: `apt-get install chromium`), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _high_fd(fd: int) -> int:
    """`fd` moved to a number >= 10 (non-inheritable, as os.pipe's; pass_fds makes it inheritable)."""
    import fcntl
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (module docstring)."""

    def __init__(self, exe: str | None = None, flags: tuple[str, ...] = ()) -> None:
        exe = exe or find_chromium()
        if not exe:
            raise RuntimeError("no chromium on PATH: apt-get install -y chromium (make test-web does)")
        self.profile = tempfile.mkdtemp(prefix="mobileinst-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        to_r, from_w = _high_fd(to_r), _high_fd(from_w)  # not 3 or 4 themselves
        # bash moves the pipe ends onto the fds the protocol uses (3: commands in, 4: replies out)
        shell = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        self.log = open(Path(self.profile) / "chromium.log", "wb")
        self.proc = subprocess.Popen(["bash", "-c", shell, exe, *CHROMIUM_FLAGS,
                                      f"--user-data-dir={self.profile}", *flags, "about:blank"],
                                     pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        os.close(to_r)
        os.close(from_w)
        self.out, self.inp = to_w, from_r
        self.lock = threading.Lock()
        self.next_id = 0
        self.pending: dict[int, queue.Queue] = {}
        self.events: dict[str, list] = {}  # sessionId -> console messages and exceptions
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._dispatch(json.loads(raw))
        for q in list(self.pending.values()):
            q.put({"error": {"message": "chromium exited"}})

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            q = self.pending.pop(msg["id"], None)
            if q is not None:
                q.put(msg)
        elif msg.get("method") in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown"):
            p = msg["params"]
            text = (" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                    or p.get("exceptionDetails", {}).get("exception", {}).get("description", ""))
            self.events.setdefault(msg.get("sessionId", ""), []).append(text)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 120) -> dict:
        """One protocol command -> its result; RuntimeError on a protocol error or a timeout."""
        with self.lock:
            self.next_id += 1
            mid, q = self.next_id, queue.Queue()
            self.pending[mid] = q
            msg = {"id": mid, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self.out, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"chromium: no reply to {method} in {timeout} s") from None
        if "error" in reply:
            raise RuntimeError(f"chromium: {method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def new_page(self, url: str, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        page.cmd("Runtime.enable")
        page.cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        page.goto(url)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.out, self.inp):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate JavaScript (promises awaited, values as JSON), screenshot."""

    def __init__(self, browser: Chromium, session: str, target: str) -> None:
        self.browser, self.session, self.target = browser, session, target

    def cmd(self, method: str, params: dict | None = None, timeout: float = 120) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    @property
    def console(self) -> list[str]:
        return self.browser.events.get(self.session, [])

    def goto(self, url: str, timeout: float = 60) -> None:
        self.cmd("Page.navigate", {"url": url})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.evaluate("document.readyState") == "complete":
                    return
            except RuntimeError:
                pass  # the new document's context is not there yet
            time.sleep(0.05)
        raise RuntimeError(f"{url}: not loaded in {timeout} s")

    def evaluate(self, expression: str, timeout: float = 300):
        res = self.cmd("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                            "returnByValue": True}, timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise RuntimeError(f"page: {d.get('exception', {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    def screenshot(self, path: str | Path) -> Path:
        data = self.cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


# -- the benchmark ---------------------------------------------------------------------------------
def page_times(browser: Chromium, base: str, names: list[str], threads: int, runs: int) -> dict:
    """{image: (network ms, end-to-end ms)} medians of the page at `threads` WASM threads."""
    page = browser.new_page(f"{base}?backend=wasm&threads={threads}")
    ready = page.evaluate("window.mobileinst.ready")
    if not ready.get("ok"):
        raise RuntimeError(f"page: {ready.get('error')}")
    if ready["threads"] != threads:
        raise RuntimeError(f"page runs {ready['threads']} threads, not {threads}: {ready.get('notes')}")
    out = {}
    for name in names:
        net, total = [], []
        for i in range(runs + 1):
            r = page.evaluate(f"window.mobileinst.runOnUrl({json.dumps(name)})")
            if not r.get("ok"):
                raise RuntimeError(f"page: {r.get('error')}")
            if i:  # the first run warms up
                net.append(r["timing"]["network"])
                total.append(r["timing"]["total"])
            page.evaluate("document.getElementById('results').replaceChildren(), "
                          "window.mobileinst.state.results.length = 0")
        out[name] = (statistics.median(net), statistics.median(total))
    browser.send("Target.closeTarget", {"targetId": page.target})
    return out


def python_times(graph: Path, images: dict, threads: int, runs: int) -> dict:
    """{image: (network ms, end-to-end ms)} medians of onnxruntime in Python on the same graph."""
    from mobileinst.infer.ort import OnnxPredictor
    from mobileinst.infer.preprocess import to_input
    pred = OnnxPredictor(graph, conf=0.3, threads=threads)
    out = {}
    for name, img in images.items():
        batch, _ = pred.prepare([img])
        x = to_input(batch, pred.info.input.dtype)
        net, total = [], []
        for i in range(runs + 1):
            t0 = time.perf_counter()
            pred.run(x)
            t1 = time.perf_counter()
            pred(img)
            t2 = time.perf_counter()
            if i:
                net.append((t1 - t0) * 1e3)
                total.append((t2 - t1) * 1e3)
        out[name] = (statistics.median(net), statistics.median(total))
    return out


def copy_images(folder: Path, files: list[str]) -> dict:
    """The given image files copied beside the page; {name: RGB array}."""
    import cv2
    images = {}
    for f in files:
        shutil.copyfile(f, folder / Path(f).name)
        images[Path(f).name] = cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)
    return images


def screenshot(browser: Chromium, base: str, name: str, path: str) -> None:
    """The page (one thread) with `name` run and drawn, saved as a PNG."""
    page = browser.new_page(base + "?threads=1", width=1000, height=560)
    page.evaluate("window.mobileinst.ready")
    page.evaluate(f"window.mobileinst.runOnUrl({json.dumps(name)})")  # warm-up, then cleared
    page.evaluate("document.getElementById('results').replaceChildren(), "
                  "window.mobileinst.state.results.length = 0")
    page.evaluate(f"window.mobileinst.runOnUrl({json.dumps(name)})")
    print(f"screenshot: {page.screenshot(path)}")
    browser.send("Target.closeTarget", {"targetId": page.target})


def export_folder(args: argparse.Namespace, out: Path) -> Path:
    from mobileinst.export.command import load_model
    from mobileinst.export.web import export_web
    ns = argparse.Namespace(weights=args.weights, model=args.model, num_classes=args.num_classes)
    model, info, _, meta = load_model(ns)
    return export_web(model, info, out, (args.imgsz, args.imgsz), conf=args.conf, metadata=meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--web", help="an `export --format web` folder")
    src.add_argument("--weights", help="a .pt checkpoint: exported first")
    src.add_argument("--model", help="a variant with random weights: exported first")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--imgsz", type=int, default=320, help="export size (with --weights/--model)")
    p.add_argument("--conf", type=float, default=0.3, help="export conf (with --weights/--model)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--sizes", default="480x640,640x480,375x500", help="HxW of the generated test images")
    p.add_argument("--images", nargs="+", help="image files to use instead of generated ones")
    p.add_argument("--screenshot", help="also save a screenshot of the page with the first image here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mobileinst.export.web import write_example_images
    from mobileinst.serve import make_server
    with tempfile.TemporaryDirectory() as tmp:
        web = Path(args.web) if args.web else export_folder(args, Path(tmp) / "web")
        served = Path(tmp) / "served"
        shutil.copytree(web, served)
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        images = copy_images(served, args.images) if args.images else write_example_images(served, sizes)
        server = make_server(served, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        rows = []
        try:
            with Chromium() as browser:
                for t in args.threads:
                    rows.append((f"Chromium WASM, {t} thread{'s' * (t > 1)}",
                                 page_times(browser, base, list(images), t, args.runs)))
                if args.screenshot:
                    screenshot(browser, base, next(iter(images)), args.screenshot)
        finally:
            server.shutdown()
            server.server_close()
        for t in args.threads:
            rows.append((f"onnxruntime (Python), {t} thread{'s' * (t > 1)}",
                         python_times(served / "model.onnx", images, t, args.runs)))
    meta = json.loads((web / "model.json").read_text())
    print(f"{meta['model_name']} at {meta['input']['size'][0]}x{meta['input']['size'][1]}, conf "
          f"{meta['conf']}, onnxruntime-web {meta['ort_web_version']}; median of {args.runs} runs, ms")
    shape = {n: f"{img.shape[1]}x{img.shape[0]}" for n, img in images.items()}
    print("| runtime | " + " | ".join(f"{shape[n]}: network / end to end" for n in images) + " |")
    print("|---|" + "---:|" * len(images))
    for label, times in rows:
        print(f"| {label} | " + " | ".join(f"{times[n][0]:.1f} / {times[n][1]:.1f}" for n in images) + " |")


if __name__ == "__main__":
    main()
