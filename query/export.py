"""CSV answers of meter queries, in OpenMeter's layout, safe to open in a spreadsheet.

Header as OpenMeter writes it (`openmeter/meter/httphandler/query_csv.go`):
`window_start,window_end[,subject][,subject_display_name][,<groupBy keys>],value`, with `subject` when
the query groups by subject and `subject_display_name` when any of the subjects has a stored subject.
Differences, on purpose: `value` is the exact decimal (OpenMeter prints `%f`, six rounded decimals).
A cell that is `null` (a missing group value) is empty; the empty string is a quoted empty cell `""`,
so the two stay distinguishable. A text cell starting with `=`, `+`, `-`, `@`, tab or carriage return
is prefixed with `'` (OWASP's advice against CSV formula injection): a spreadsheet shows it as text
instead of running it. Numbers and timestamps are never prefixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NEEDS_QUOTES = (",", '"', "\n", "\r")


def prefers_csv(accept: str | None) -> bool:
    """Content negotiation (RFC 9110 §12.5.1): CSV when the client ranks `text/csv` above JSON.

    Ties and absent ranks favour JSON, the default answer; `*/*` and `text/*` rank like any other range.
    """
    def rank(media: str) -> float:
        best, best_specificity = 0.0, -1
        for item in (accept or "").split(","):
            kind, *params = (p.strip() for p in item.split(";"))
            q = 1.0
            for param in params:
                name, _, value = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0
            kind = kind.lower()
            main = media.split("/")[0]
            specificity = 2 if kind == media else 1 if kind == f"{main}/*" else 0 if kind == "*/*" else -1
            if specificity > best_specificity:
                best, best_specificity = q, specificity
        return best

    return rank("text/csv") > rank("application/json")


def text_cell(value: str | None) -> str:
    """A text cell: None -> empty, "" -> `""`, formula-like text -> prefixed with `'` and quoted."""
    if value is None:
        return ""
    if value.startswith(FORMULA_START):
        value = "'" + value
    if value == "" or any(c in value for c in _NEEDS_QUOTES) or value != value.strip(" "):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_text(header: Sequence[str], rows: Iterable[tuple[Sequence[str], Sequence[str | None], str]]) -> str:
    """`rows` are (plain cells: timestamps, text cells, value); lines end in CRLF as RFC 4180 says."""
    lines = [",".join(header)]
    for plain, texts, value in rows:
        lines.append(",".join([*plain, *(text_cell(t) for t in texts), value]))
    return "\r\n".join(lines) + "\r\n"
