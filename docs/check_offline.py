"""Fail if a built page would fetch anything from the internet when it is opened.

    python docs/check_offline.py docs/_build/html

Scans every HTML file for ``src`` attributes (scripts, images, frames,
media), ``<link href>`` that loads something (stylesheets, preloads, icons,
fonts) and inline ``<style>``/``<script>`` text; scans every CSS file for
``url(...)`` and ``@import``. A reference is remote when it starts with
``http:``, ``https:`` or ``//``. Plain links (``<a href>``) are not fetched
on opening and are not counted. Any mention of Google Fonts fails too.
Prints what it scanned and exits 1, listing each remote reference, if it
found any.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

REMOTE = re.compile(r"^\s*(https?:|//)", re.I)
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)""", re.I)
INLINE_URL = re.compile(r"""['"(]\s*((?:https?:)?//[^'")\s]+)""", re.I)
FONT_HOSTS = ("fonts.googleapis.com", "fonts.gstatic.com")
LOADING_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "manifest", "font"}


@dataclass
class Scan:
    """What was looked at and what was remote, over a whole build."""

    pages: int = 0
    css_files: int = 0
    references: dict[str, int] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)

    def saw(self, kind: str, where: str, value: str) -> None:
        self.references[kind] = self.references.get(kind, 0) + 1
        if REMOTE.match(value):
            self.remote.append(f"{where}: {kind} {value}")


class _Page(HTMLParser):
    def __init__(self, scan: Scan, where: str) -> None:
        super().__init__(convert_charrefs=True)
        self.scan, self.where, self.inline = scan, where, ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {name: value or "" for name, value in attrs}
        if "src" in a:
            self.scan.saw(f"<{tag} src>", self.where, a["src"])
        if tag == "link" and LOADING_RELS & set(a.get("rel", "").lower().split()):
            self.scan.saw(f"<link rel={a.get('rel')} href>", self.where, a.get("href", ""))
        if tag in ("style", "script") and "src" not in a:
            self.inline = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self.inline:
            self.inline = ""

    def handle_data(self, data: str) -> None:
        if self.inline == "style":
            scan_css(self.scan, f"{self.where} <style>", data)
        elif self.inline == "script":
            for url in INLINE_URL.findall(data):
                self.scan.saw("inline <script> URL", self.where, url)


def scan_css(scan: Scan, where: str, text: str) -> None:
    for url, imported in CSS_URL.findall(text):
        if url:
            scan.saw("CSS url()", where, url)
        if imported:
            scan.saw("CSS @import", where, imported)


def scan_build(html_dir: Path) -> Scan:
    scan = Scan()
    for path in sorted(html_dir.rglob("*")):
        if path.suffix not in (".html", ".css", ".js") or not path.is_file():
            continue
        where = path.relative_to(html_dir).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for host in FONT_HOSTS:
            if host in text:
                scan.remote.append(f"{where}: mentions {host}")
        if path.suffix == ".html":
            scan.pages += 1
            _Page(scan, where).feed(text)
        elif path.suffix == ".css":
            scan.css_files += 1
            scan_css(scan, where, text)
    return scan


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python docs/check_offline.py HTML_DIR", file=sys.stderr)
        return 2
    scan = scan_build(Path(argv[0]))
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(scan.references.items()))
    print(f"scanned {scan.pages} HTML pages and {scan.css_files} CSS files: {counts}")
    if scan.pages == 0:
        print("no HTML page found: nothing was checked")
        return 1
    if scan.remote:
        print(f"{len(scan.remote)} remote references:")
        for line in scan.remote:
            print(f"  {line}")
        return 1
    print("no remote script, stylesheet, font or image: the pages open offline")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
