"""Open the main pages in headless Chromium, as a reader would, and check what shows.

    python docs/check_render.py docs/_build/html docs/_build/screenshots

The built site is served from 127.0.0.1 and every other host is made
unresolvable, so a page that needed the internet would show it. For each
page it takes a screenshot and dumps the DOM after MathJax has had time to
typeset, then checks that every formula of the page became a MathJax
``mjx-container``, that none is a TeX error or shows a backslash (a macro
MathJax did not understand), that no raw TeX delimiter is left in the
text, and that every image is a non-empty PNG or SVG file of the build.
Without Chromium (Debian's ``chromium`` package) it says so and exits 0;
with it, it exits 1 if any check failed.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

PAGES = (
    "index",
    "definition",
    "why-cache",
    "caches",
    "blockwise",
    "backward",
    "distributed",
    "verify",
    "conformance",
    "backends",
    "api",
)
WINDOW = "1280,3000"
TIME_BUDGET_MS = 20000  # virtual time for MathJax to load and typeset
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
MATH_SOURCE = re.compile(r'class="math[ "]')
IMG_SRC = re.compile(r'<img\b[^>]*?\bsrc="([^"]+)"', re.I)
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$")
SHOWN_BACKSLASH = re.compile(
    r"class=\"mjx-c5C[\" ]"
)  # MathJax draws a "\\" glyph: TeX it did not parse
PRE = re.compile(r"<pre\b.*?</pre>", re.S | re.I)
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"<svg", b"<?xml")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _quiet_handler(directory: Path) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    return functools.partial(Handler, directory=str(directory))  # type: ignore[return-value]


def chromium(binary: str, profile: Path, *args: str) -> str:
    run = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"chromium exited {run.returncode}: {run.stderr[-2000:]}")
    return run.stdout


def check_page(binary: str, html: Path, base: str, page: str, shots: Path) -> list[str]:
    """Render one page; return what is wrong with it (empty when all is well)."""
    source = (html / f"{page}.html").read_text(encoding="utf-8")
    url = f"{base}/{page}.html"
    budget = f"--virtual-time-budget={TIME_BUDGET_MS}"
    with tempfile.TemporaryDirectory() as profile:
        chromium(binary, Path(profile), budget, f"--screenshot={shots / page}.png", url)
    with tempfile.TemporaryDirectory() as profile:
        dom = chromium(binary, Path(profile), budget, "--dump-dom", url)
    problems = []
    expected = len(MATH_SOURCE.findall(source))
    rendered = dom.count("<mjx-container")
    errors = dom.count("<mjx-merror")
    raw = RAW_TEX.findall(PRE.sub("", dom))
    backslashes = len(SHOWN_BACKSLASH.findall(dom))
    if rendered < expected:
        problems.append(f"{rendered} of {expected} formulas typeset")
    if errors:
        problems.append(f"{errors} formulas are TeX errors")
    if backslashes:
        problems.append(f"{backslashes} backslashes shown inside formulas (a macro not understood)")
    if raw:
        problems.append(f"raw TeX delimiters left in the text: {sorted(set(raw))}")
    images = IMG_SRC.findall(dom)
    for src in images:
        problems += _check_image(html, src)
    screenshot = shots / f"{page}.png"
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        problems.append("no screenshot written")
    print(
        f"{page}.html: {rendered} formulas typeset ({expected} in the page), {errors} errors, "
        f"{len(images)} images; screenshot {screenshot}"
    )
    return [f"{page}.html: {p}" for p in problems]


def _check_image(html: Path, src: str) -> list[str]:
    parsed = urlparse(src)
    if parsed.scheme not in ("", "http") or (parsed.netloc and parsed.hostname != "127.0.0.1"):
        return [f"image {src} is not served by the build"]
    path = html / unquote(parsed.path).lstrip("/")
    if not path.is_file() or path.stat().st_size == 0:
        return [f"image {src} is missing or empty"]
    if not path.read_bytes()[:8].startswith(SIGNATURES):
        return [f"image {src} is not a PNG or SVG"]
    return []


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not Path(argv[0]).is_dir():
        print("usage: python docs/check_render.py HTML_DIR SCREENSHOT_DIR", file=sys.stderr)
        return 2
    html, shots = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    binary = find_chromium()
    if binary is None:
        print("chromium is not installed (apt-get install chromium): render check skipped")
        return 0
    shots.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(html))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        problems = [p for page in PAGES for p in check_page(binary, html, base, page, shots)]
    finally:
        server.shutdown()
    if problems:
        print(f"{len(problems)} problems:")
        for line in problems:
            print(f"  {line}")
        return 1
    print(f"{len(PAGES)} pages rendered: every formula typeset, every image present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
