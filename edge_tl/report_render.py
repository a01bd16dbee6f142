"""The report's document tree and its two renderers, Markdown and HTML.

:mod:`edge_tl.report` builds a report once as a tuple of :class:`Section` objects (paragraphs,
bullets, tables, figures, preformatted text made of plain strings, :class:`Code` and
:class:`Strong` parts); :func:`render_markdown` and :func:`render_html` turn the same tree into
report.md and report.html, so both say the same thing and text from the run (class names, paths)
is escaped here and nowhere else.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Sequence, Union


# --- document tree ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str
    tone: str = ""  # "pass", "fail" or "inconclusive": coloured in HTML


Inline = Union[str, Code, Strong]
Parts = Union[Inline, Sequence[Inline]]


@dataclass(frozen=True)
class Paragraph:
    parts: Parts


@dataclass(frozen=True)
class Bullets:
    items: tuple[Parts, ...]


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Parts, ...], ...]


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the run directory, POSIX separators
    caption: str


@dataclass(frozen=True)
class Preformatted:
    text: str


Block = Union[Paragraph, Bullets, Table, Figure, Preformatted]


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


# --- rendering ----------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*\[\]<|#])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _inline(parts: Parts) -> Sequence[Inline]:
    return (parts,) if isinstance(parts, (str, Code, Strong)) else parts


def _md_text(text: str) -> str:
    return _MD_SPECIAL.sub(lambda match: "\\" + match.group(0), text).replace("\n", " ")


def _fence(text: str, least: int) -> str:
    return "`" * max(least, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)


def _md(parts: Parts) -> str:
    out = []
    for part in _inline(parts):
        if isinstance(part, Code):
            out.append(f"{_fence(part.text, 1)} {part.text} {_fence(part.text, 1)}" if "`" in part.text
                       else f"`{part.text}`")
        else:
            out.append(f"**{_md_text(part.text)}**" if isinstance(part, Strong) else _md_text(part))
    return "".join(out)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {_md_text(title)}", ""]
    for section in sections:
        out += [f"## {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(_md(block.parts))
            elif isinstance(block, Bullets):
                out += [f"- {_md(item)}" for item in block.items]
            elif isinstance(block, Table):
                out += ["| " + " | ".join(map(_md_text, block.columns)) + " |", "|---" * len(block.columns) + "|"]
                out += ["| " + " | ".join(map(_md, row)) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                out.append(f"![{_md_text(block.caption)}]({block.path})")
            elif isinstance(block, Preformatted):
                out += [f"{_fence(block.text, 3)}yaml", block.text.rstrip("\n"), _fence(block.text, 3)]
            out.append("")
    return "\n".join(out)


def _html(parts: Parts) -> str:
    out = []
    for part in _inline(parts):
        if isinstance(part, Code):
            out.append(f"<code>{html.escape(part.text)}</code>")
        elif isinstance(part, Strong):
            tone = f' class="{part.tone}"' if part.tone else ""
            out.append(f"<strong{tone}>{html.escape(part.text)}</strong>")
        else:
            out.append(html.escape(part))
    return "".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}.pass{color:#137333}.fail{color:#c5221f}.inconclusive{color:#b06000}
.wide{overflow-x:auto}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:0.9em;color:#555}
pre{background:#f6f6f6;padding:1em}"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """A self-contained page (inline CSS); figures are referenced relative to the run directory."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(f"<p>{_html(block.parts)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{_html(item)}</li>" for item in block.items) + "</ul>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{html.escape(column)}</th>" for column in block.columns)
                body = "".join("<tr>" + "".join(f"<td>{_html(cell)}</td>" for cell in row) + "</tr>"
                               for row in block.rows)
                out.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
                           f"<tbody>{body}</tbody></table></div>")
            elif isinstance(block, Figure):
                out.append(f'<figure><img src="{html.escape(block.path)}" alt="{html.escape(block.caption)}">'
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
            elif isinstance(block, Preformatted):
                out.append(f"<pre>{html.escape(block.text)}</pre>")
    return "\n".join(out + ["</body></html>", ""])
