"""Corpora of several sizes and languages for measuring the corpus-sized recipe.

    python benchmarks/recipe_corpora.py DIR        # writes DIR/<name>.txt, prints their sizes

The texts come from Debian's fortune packages (quotations, jokes and poems, downloaded with
``apt-get download`` from the package archive and unpacked with ``dpkg-deb``), so anyone can
rebuild the same files; Tiny Shakespeare is used from the dataset cache as it is. The fortune
separators (a line holding ``%``) become blank lines and terminal colour codes are removed.

| name | text | language |
|---|---|---|
| en-quotes | fortunes-min: English quotations | English |
| zh-tang | fortunes-zh: 300 Tang poems | classical Chinese |
| de-unfug | fortunes-de: "Unfug" (nonsense and jokes) | German |
| ru-mix | fortunes-ru: love, life, knowledge, politics, education | Russian |
| it-italia | fortunes-it: "italia" | Italian |
| de-zitate | fortunes-de: quotations | German |
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("fortunes-min", "fortunes-zh", "fortunes-de", "fortunes-ru", "fortunes-it")
FORTUNES = "usr/share/games/fortunes"
CORPORA = {
    "en-quotes": ["fortunes"],
    "zh-tang": ["tang300"],
    "de-unfug": ["de/unfug"],
    "ru-mix": ["ru/love", "ru/life", "ru/knowledge", "ru/polit", "ru/education"],
    "it-italia": ["it/italia"],
    "de-zitate": ["de/zitate"],
}
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
SEPARATOR = re.compile(r"(?m)^%\n")


def unpack(packages: tuple[str, ...], into: Path) -> Path:
    """Download the Debian packages into ``into`` and unpack them there; the unpacked root."""
    subprocess.run(["apt-get", "download", *packages], cwd=into, check=True,
                   stdout=subprocess.DEVNULL)
    root = into / "root"
    for deb in sorted(into.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def clean(paths: list[Path]) -> str:
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
    return SEPARATOR.sub("\n", COLOUR.sub("", text))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(PACKAGES, Path(tmp)) / FORTUNES
        for name, files in CORPORA.items():
            text = clean([root / f for f in files])
            (out / f"{name}.txt").write_text(text, encoding="utf-8")
            print(f"{name:10} {len(text):>9,} chars {len(text.encode()):>9,} bytes "
                  f"{len(set(text)):>5} distinct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
