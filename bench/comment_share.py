"""Share of comment and docstring characters per module under src/ (issue 21's readability measure).

Usage: python bench/comment_share.py [ROOT]   (ROOT defaults to src/voxtral_realtime)
Counts '#' comments (tokenize) and docstring literals (ast: module, class and function docstrings) against all
characters in the file; prints one row per module, sorted by share, and the total.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def comment_chars(source: str) -> tuple[int, int]:
    """Returns (characters in '#' comments, characters in docstring literals) of one module's source."""
    comments = sum(len(tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type == tokenize.COMMENT)
    lines = source.splitlines(keepends=True)
    docstrings = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                text = "".join(lines[first.lineno - 1:first.end_lineno])
                docstrings += len(text.strip())
    return comments, docstrings


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src/voxtral_realtime")
    rows, total, total_comment = [], 0, 0
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        comments, docstrings = comment_chars(source)
        rows.append((path.relative_to(root).as_posix(), len(source), comments, docstrings))
        total += len(source)
        total_comment += comments + docstrings
    print(f"{'module':<34} {'chars':>7} {'#':>6} {'doc':>6} {'share':>6}")
    for name, size, comments, docstrings in sorted(rows, key=lambda r: -(r[2] + r[3]) / max(r[1], 1)):
        print(f"{name:<34} {size:>7} {comments:>6} {docstrings:>6} {(comments + docstrings) / max(size, 1):>6.0%}")
    print(f"{'total':<34} {total:>7} {'':>6} {'':>6} {total_comment / max(total, 1):>6.0%}")


if __name__ == "__main__":
    main()
