"""Markdown tables for reports and benchmark results (plain strings, no dependencies)."""

from __future__ import annotations


def markdown_table(header: list[str] | tuple, rows: list[list] | list[tuple]) -> str:
    """A GitHub-style table: header row, separator, one line per row (cells formatted with str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
