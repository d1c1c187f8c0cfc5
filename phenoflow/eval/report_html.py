"""The report as a list of sections, rendered to Markdown (metrics.md) and to a self-contained HTML page
(index.html: inline style, images referenced relatively, tables as HTML tables)."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str  # `code` spans allowed


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass
class Img:
    alt: str
    src: str  # relative to the report folder


@dataclass
class Items:
    items: list[str]


Section = H | P | Table | Img | Items

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #bbb;padding:2px 8px;"
         "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%;display:block;margin:.5em 0}code{background:#f4f4f4}")


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|")


def to_markdown(doc: list[Section]) -> str:
    out: list[str] = []
    for s in doc:
        if isinstance(s, H):
            out += ["#" * s.level + " " + s.text, ""]
        elif isinstance(s, P):
            out += [s.text, ""]
        elif isinstance(s, Table):
            out.append("| " + " | ".join(map(_cell, s.head)) + " |")
            out.append("|" + "---|" * len(s.head))
            out += ["| " + " | ".join(map(_cell, r)) + " |" for r in s.rows]
            out.append("")
        elif isinstance(s, Img):
            out += [f"![{s.alt}]({s.src})", ""]
        elif isinstance(s, Items):
            out += [f"- {i}" for i in s.items] + [""]
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escape, then `code` -> <code>code</code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _color_cell(text: str) -> str:
    """A '#rrggbb' cell gets a colour swatch."""
    if re.fullmatch(r"#[0-9a-f]{6}", text):
        return (f'<span style="display:inline-block;width:1.2em;height:.9em;background:{text};'
                f'border:1px solid #000;vertical-align:middle"></span> {text}')
    return _inline(text)


def to_html(doc: list[Section], title: str) -> str:
    body: list[str] = []
    for s in doc:
        if isinstance(s, H):
            body.append(f"<h{s.level}>{_inline(s.text)}</h{s.level}>")
        elif isinstance(s, P):
            body.append(f"<p>{_inline(s.text)}</p>")
        elif isinstance(s, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in s.head)
            rows = "\n".join("<tr>" + "".join(f"<td>{_color_cell(c)}</td>" for c in r) + "</tr>" for r in s.rows)
            body.append(f"<table>\n<tr>{head}</tr>\n{rows}\n</table>")
        elif isinstance(s, Img):
            body.append(f'<img src="{html.escape(s.src, quote=True)}" alt="{html.escape(s.alt, quote=True)}">')
        elif isinstance(s, Items):
            body.append("<ul>\n" + "\n".join(f"<li>{_inline(i)}</li>" for i in s.items) + "\n</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
