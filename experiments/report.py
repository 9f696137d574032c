"""The lesson report's renderer: a list of blocks as Markdown, or as one self-contained HTML page.

Blocks: ('h1'|'h2', text, anchor), ('p', text), ('code', text, language), ('table', header, rows), ('image', name,
path relative to the report). Texts use Markdown's inline forms (`code`, **bold**, [link](#anchor)).
"""

import base64
import html
import re
from pathlib import Path


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(blocks: list[tuple]) -> str:
    """The report's blocks as Markdown."""
    parts = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            text, anchor = rest
            heading = ("# " if kind == "h1" else "## ") + text
            parts.append(f'<a id="{anchor}"></a>\n{heading}' if anchor else heading)
        elif kind == "p":
            parts.append(rest[0])
        elif kind == "code":
            text, language = rest
            parts.append(f"```{language}\n{text}\n```")
        elif kind == "table":
            parts.append(_markdown_table(*rest))
        elif kind == "image":
            parts.append(f"![{rest[0]}]({rest[1]})")
    return "\n\n".join(parts) + "\n"


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; border-radius: 4px; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figcaption { color: #666; font-size: 0.85em; }
"""


def _inline_html(text: str) -> str:
    """Markdown's inline forms used in the report (`code`, **bold**, [text](#anchor)) as HTML, the rest escaped."""
    parts = text.split("`")
    for i, part in enumerate(parts):
        part = html.escape(part)
        if i % 2:
            parts[i] = f"<code>{part}</code>"
        else:
            parts[i] = _LINK.sub(r'<a href="\2">\1</a>', _BOLD.sub(r"<strong>\1</strong>", part))
    return "".join(parts)


def render_html(blocks: list[tuple], folder: Path) -> str:
    """The report's blocks as one self-contained HTML page: the plots (read from `folder`) inline as base64 PNGs."""
    title = next(rest[0] for kind, *rest in blocks if kind == "h1")
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            text, anchor = rest
            attribute = f' id="{anchor}"' if anchor else ""
            body.append(f"<{kind}{attribute}>{html.escape(text)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline_html(cell)}</th>" for cell in header)
            cells = ["".join(f"<td>{_inline_html(cell)}</td>" for cell in row) for row in rows]
            body.append(f"<table><tr>{head}</tr>" + "".join(f"<tr>{row}</tr>" for row in cells) + "</table>")
        elif kind == "image":
            name, relative = rest
            path = folder / relative
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                    f"<figcaption>{html.escape(relative)}</figcaption></figure>"
                )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` at once, so a reader never sees half a report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
