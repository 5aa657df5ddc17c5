#!/usr/bin/env python3
"""Converts Debian's `fortunes` data files into the demo corpus (JSONL, one fortune a line).

Provenance: Debian package `fortunes` 1:1.99.1-7.3 (bookworm), files under
/usr/share/games/fortunes/. Run once:

    apt-get download fortunes && dpkg-deb -x fortunes_*.deb x
    python3 convert_fortunes.py x/usr/share/games/fortunes > fortunes.jsonl
"""
import json
import sys
from pathlib import Path

FILES = ["fortunes", "computers", "science", "wisdom", "literature", "education",
         "humorists", "law", "platitudes", "goedel", "work"]


def main(root: str) -> None:
    for name in FILES:
        text = (Path(root) / name).read_text(encoding="utf-8", errors="replace")
        for item in text.split("\n%\n"):
            item = item.strip("%\n").rstrip()
            if item.strip():
                print(json.dumps({"text": item, "source": name}, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
