"""Check the docs: README.md is short and every relative Markdown link resolves.

    python3 tools/check_docs.py            # README.md <= 150 lines; links in README.md, CONTRIBUTING.md, docs/*.md
    python3 tools/check_docs.py --anchors  # also check that #anchors into Markdown files exist

A link is relative when it has no URL scheme (``http:``, ``mailto:`` ...) and does not start with ``/``
or ``#``; it resolves when the path, taken from the linking file's folder, names an existing file or
folder. Links inside fenced code blocks and inline code are ignored. Anchors are checked only with
``--anchors``, against GitHub's heading slugs. Standard library only; exit status 1 on any problem,
with one line per problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
MAX_README_LINES = 150

# [text](target) and ![alt](target); the target may hold one level of balanced parentheses.
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*(<[^>]*>|(?:[^()\s]|\([^()\s]*\))*)(?:\s+[\"'(].*?)?\s*\)")
# [label]: target
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.is_file()]


def prose_lines(text: str, strip_code: bool = True):
    """(line number, line) outside fenced code blocks, with inline code removed unless told not to."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif fence == match.group(1):
                fence = None
            continue
        if fence is None:
            yield number, INLINE_CODE.sub("", line) if strip_code else line


def links(text: str):
    """(line number, target) of every inline link, image and reference definition."""
    for number, line in prose_lines(text):
        for match in INLINE_LINK.finditer(line):
            yield number, match.group(1).strip("<>")
        match = REFERENCE_DEF.match(line)
        if match:
            yield number, match.group(1).strip("<>")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), strip_code=False):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def shown(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # outside the repository
        return str(path)


def check(check_anchors: bool) -> list[str]:
    problems = []
    readme = ROOT / "README.md"
    if not readme.is_file():
        return ["README.md: missing"]
    n_lines = len(readme.read_text(encoding="utf-8").splitlines())
    if n_lines > MAX_README_LINES:
        problems.append(
            f"README.md: {n_lines} lines, more than {MAX_README_LINES}: move detail into docs/ and link to it"
        )
    for doc in doc_files():
        name = doc.relative_to(ROOT).as_posix()
        for number, target in links(doc.read_text(encoding="utf-8")):
            if not target or SCHEME.match(target) or target.startswith("/"):
                continue
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part.split("?", 1)[0])
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                problems.append(f"{name}:{number}: link target '{target}' does not exist ({shown(dest)})")
                continue
            if check_anchors and anchor and dest.is_file() and dest.suffix == ".md":
                if unquote(anchor).lower() not in anchors(dest):
                    problems.append(f"{name}:{number}: no heading for anchor '#{anchor}' in {shown(dest)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", action="store_true", help="also check #anchors into Markdown files")
    args = parser.parse_args(argv)
    problems = check(args.anchors)
    for problem in problems:
        print(f"check_docs: {problem}", file=sys.stderr)
    if problems:
        print(f"check_docs: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_docs: ok ({len(doc_files())} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
