"""The report's PDF, written directly: pages of text, and line charts as PDF drawing operators.

matplotlib drew the report in about half a second, the first time in a process (and a cycle draws
it once, in a new process): most of it went to finding fonts, reading their metrics and laying
out every text and tick with machinery the report does not need. This module writes the same
pages in a few hundredths of a second.

Text is in the PDF's standard fonts, which every reader has and nothing embeds: Helvetica-Bold
for titles and headings, Helvetica for chart titles (both only ever left-aligned) and Courier for
everything else. Every Courier character is 0.6 of the font size wide, so centring and aligning
need no font metrics. Text outside Windows-1252 (the fonts' encoding) is written as "?".

Charts are what the report needs and no more: axes with ticks and labels, lines, markers,
dashed references, error bars, a grid and a legend. confusionmatrix.png stays with matplotlib: a
PNG needs a rasteriser.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

PAGE_WIDTH, PAGE_HEIGHT = 595.28, 841.89  # A4, in points
COURIER_EM = 0.6  # the advance of every Courier character, in font sizes
FONTS = {"Helvetica-Bold": "F1", "Helvetica": "F2", "Courier": "F3"}
# matplotlib's default colours ("tab10"), so that charts look as they did.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
GREY = "#808080"
BLACK = "#000000"


def text_width(text: str, size: float) -> float:
    """The width of `text` in Courier at `size` points."""
    return len(text) * COURIER_EM * size


class Page:
    """One A4 page: drawing operators in points, from the bottom left corner."""

    def __init__(self) -> None:
        self.operators: list[str] = []

    def text(
        self, x: float, y: float, text: str, *, size: float, font: str = "Courier",
        align: str = "left", colour: str = BLACK, vertical: bool = False,
    ) -> None:
        """`text` with its baseline at `y`; `align` says where `x` is: its left, centre or right
        end (centre and right for Courier only). Vertical text reads upwards."""
        if align != "left":
            shift = text_width(text, size) * (0.5 if align == "center" else 1.0)
            if vertical:
                y -= shift
            else:
                x -= shift
        matrix = f"0 1 -1 0 {x:.2f} {y:.2f}" if vertical else f"1 0 0 1 {x:.2f} {y:.2f}"
        self.operators.append(
            f"BT {_rgb(colour)} rg /{FONTS[font]} {size:g} Tf {matrix} Tm ({_pdf_text(text)}) Tj ET"
        )

    def lines(
        self, points: Sequence[tuple[float, float]], *, colour: str = BLACK, width: float = 1.0,
        dashed: bool = False,
    ) -> None:
        """A line through `points`, broken where a coordinate is not a number."""
        path: list[str] = []
        pen_down = False
        for x, y in points:
            if math.isnan(x) or math.isnan(y):
                pen_down = False
                continue
            path.append(f"{x:.2f} {y:.2f} {'l' if pen_down else 'm'}")
            pen_down = True
        if path:
            dash = "[3.7 1.6] 0 d" if dashed else "[] 0 d"
            self.operators.append(
                f"{_rgb(colour)} RG {width:g} w {dash} " + " ".join(path) + " S"
            )

    def markers(
        self, points: Sequence[tuple[float, float]], *, colour: str, radius: float = 2.5,
    ) -> None:
        """A filled circle at each point (a point that is not a number is left out)."""
        kappa = 0.5523 * radius  # four Bézier curves make a circle
        shapes = []
        for x, y in points:
            if math.isnan(x) or math.isnan(y):
                continue
            r, k = radius, kappa
            shapes.append(
                f"{x + r:.2f} {y:.2f} m "
                f"{x + r:.2f} {y + k:.2f} {x + k:.2f} {y + r:.2f} {x:.2f} {y + r:.2f} c "
                f"{x - k:.2f} {y + r:.2f} {x - r:.2f} {y + k:.2f} {x - r:.2f} {y:.2f} c "
                f"{x - r:.2f} {y - k:.2f} {x - k:.2f} {y - r:.2f} {x:.2f} {y - r:.2f} c "
                f"{x + k:.2f} {y - r:.2f} {x + r:.2f} {y - k:.2f} {x + r:.2f} {y:.2f} c f"
            )
        if shapes:
            self.operators.append(f"{_rgb(colour)} rg " + " ".join(shapes))

    def rectangle(
        self, x: float, y: float, width: float, height: float, *, stroke: str | None = BLACK,
        fill: str | None = None, line_width: float = 0.8,
    ) -> None:
        paint = {(True, True): "B", (True, False): "S", (False, True): "f"}[
            (stroke is not None, fill is not None)
        ]
        colours = (f"{_rgb(stroke)} RG " if stroke else "") + (f"{_rgb(fill)} rg " if fill else "")
        self.operators.append(
            f"{colours}{line_width:g} w [] 0 d {x:.2f} {y:.2f} {width:.2f} {height:.2f} re {paint}"
        )


class Document:
    """Pages, written as one PDF file; the same pages always give the same bytes."""

    def __init__(self, title: str, created: datetime) -> None:
        self.title = title
        self.created = created
        self.pages: list[Page] = []

    def new_page(self) -> Page:
        page = Page()
        self.pages.append(page)
        return page

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        fonts = len(FONTS)
        first_page = 4 + fonts  # 1 catalog, 2 page tree, 3 information, then the fonts
        objects: list[bytes] = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            (
                "<< /Type /Pages /Kids ["
                + " ".join(f"{first_page + 2 * n} 0 R" for n in range(len(self.pages)))
                + f"] /Count {len(self.pages)} >>"
            ).encode(),
            (
                f"<< /Title ({_pdf_text(self.title)}) /Producer (reportpdf.py) "
                f"/CreationDate (D:{self.created.astimezone(UTC):%Y%m%d%H%M%S}Z) >>"
            ).encode(),
        ]
        objects += [
            f"<< /Type /Font /Subtype /Type1 /BaseFont /{name} /Encoding /WinAnsiEncoding >>"
            .encode() for name in FONTS
        ]
        font_resources = " ".join(f"/{key} {4 + n} 0 R" for n, key in enumerate(FONTS.values()))
        for n, page in enumerate(self.pages):
            content = zlib.compress("\n".join(page.operators).encode("cp1252"), 6)
            objects.append(
                f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_WIDTH} {PAGE_HEIGHT}] "
                f"/Resources << /Font << {font_resources} >> >> "
                f"/Contents {first_page + 2 * n + 1} 0 R >>".encode()
            )
            objects.append(
                f"<< /Length {len(content)} /Filter /FlateDecode >>\nstream\n".encode()
                + content + b"\nendstream"
            )
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(len(out))
            out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
        out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
        out += (
            f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 3 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n"
        ).encode()
        return bytes(out)


def _pdf_text(text: str) -> str:
    """`text` as the inside of a PDF string in Windows-1252: backslashes and brackets escaped."""
    encodable = text.encode("cp1252", errors="replace").decode("cp1252")
    return encodable.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _rgb(colour: str) -> str:
    red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return f"{red:.3f} {green:.3f} {blue:.3f}"


# --- Charts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """A chart's axis: the span drawn, the ticks (value and label) and the axis' own label."""

    low: float
    high: float
    ticks: tuple[tuple[float, str], ...]
    label: str = ""


@dataclass(frozen=True)
class Series:
    """Points of one thing, in the axes' units; NaN breaks the line."""

    label: str
    points: list[tuple[float, float]]
    colour: str | None = None  # None: the next of COLOURS
    line: bool = True
    dashed: bool = False
    marker_radius: float = 0.0  # 0: no markers
    errors: list[tuple[float, float]] | None = None  # each point's (low, high), drawn as bars


@dataclass(frozen=True)
class Chart:
    """Axes in a box of the page (points), with a title, the series and a legend."""

    title: str
    x: Axis
    y: Axis
    series: list[Series] = field(default_factory=list)
    legend: str = "upper left"  # or "upper right", "lower right"
    legend_columns: int = 1
    grid: bool = False
    message: str | None = None  # instead of series: said in the middle, without axes


TICK_SIZE = 7.5
TICK_LENGTH = 3.5


def draw_chart(page: Page, chart: Chart, left: float, bottom: float, width: float,
               height: float) -> None:
    """Draw `chart` with its axes' box at (left, bottom), `width` by `height` points."""
    page.text(left, bottom + height + 6, chart.title, size=10, font="Helvetica")
    if chart.message is not None:
        page.text(left + width / 2, bottom + height / 2, chart.message, size=TICK_SIZE,
                  align="center")
        return

    colours = iter(COLOURS * 4)
    entries = [(series, series.colour or next(colours)) for series in chart.series]
    legend = _legend_layout(chart, entries, width)
    y_high = chart.y.high
    if legend is not None and chart.legend.startswith("upper"):
        # Room above the data for the legend, which would otherwise hide the highest points.
        data_height = max(height - legend.height - 8, height / 2)
        y_high = chart.y.low + (chart.y.high - chart.y.low) * height / data_height

    def at_x(value: float) -> float:
        return left + (value - chart.x.low) / (chart.x.high - chart.x.low) * width

    def at_y(value: float) -> float:
        return bottom + (value - chart.y.low) / (y_high - chart.y.low) * height

    if chart.grid:
        light = "#dcdcdc"
        for value, _ in chart.x.ticks:
            page.lines([(at_x(value), bottom), (at_x(value), bottom + height)], colour=light,
                       width=0.6)
        for value, _ in chart.y.ticks:
            page.lines([(left, at_y(value)), (left + width, at_y(value))], colour=light,
                       width=0.6)
    for series, colour in entries:
        points = [(at_x(x), at_y(y)) for x, y in series.points]
        if series.errors is not None:
            for (x, _), (low, high) in zip(series.points, series.errors, strict=True):
                if math.isnan(low) or math.isnan(high):
                    continue
                page.lines([(at_x(x), at_y(low)), (at_x(x), at_y(high))], colour=colour)
                for end in (low, high):
                    page.lines([(at_x(x) - 2.5, at_y(end)), (at_x(x) + 2.5, at_y(end))],
                               colour=colour)
        if series.line:
            page.lines(points, colour=colour, width=1.3, dashed=series.dashed)
        if series.marker_radius:
            page.markers(points, colour=colour, radius=series.marker_radius)
    page.rectangle(left, bottom, width, height, line_width=0.8)
    for value, label in chart.x.ticks:
        page.lines([(at_x(value), bottom), (at_x(value), bottom - TICK_LENGTH)], width=0.8)
        page.text(at_x(value), bottom - TICK_LENGTH - 9, label, size=TICK_SIZE, align="center")
    label_width = 0.0
    for value, label in chart.y.ticks:
        page.lines([(left, at_y(value)), (left - TICK_LENGTH, at_y(value))], width=0.8)
        page.text(left - TICK_LENGTH - 2, at_y(value) - 2.6, label, size=TICK_SIZE, align="right")
        label_width = max(label_width, text_width(label, TICK_SIZE))
    if chart.x.label:
        page.text(left + width / 2, bottom - TICK_LENGTH - 21, chart.x.label, size=TICK_SIZE,
                  align="center")
    if chart.y.label:
        page.text(left - TICK_LENGTH - label_width - 8, bottom + height / 2, chart.y.label,
                  size=TICK_SIZE, align="center", vertical=True)
    if legend is not None:
        _draw_legend(page, chart, entries, legend, left, bottom, width, height)


LEGEND_SIZE = 6.5
LEGEND_SAMPLE, LEGEND_GAP, LEGEND_ROW = 16.0, 4.0, 9.5


class _Legend(NamedTuple):
    columns: int
    column_width: float
    width: float
    height: float


def _legend_layout(
    chart: Chart, entries: list[tuple[Series, str]], axes_width: float
) -> _Legend | None:
    """As many columns (up to chart.legend_columns) as fit in the axes; None without series."""
    if not entries:
        return None
    column_width = (LEGEND_SAMPLE + LEGEND_GAP + 10
                    + max(text_width(series.label, LEGEND_SIZE) for series, _ in entries))
    columns = max(1, min(chart.legend_columns, len(entries), int((axes_width - 8) // column_width)))
    rows = math.ceil(len(entries) / columns)
    return _Legend(columns, column_width, columns * column_width + 4, rows * LEGEND_ROW + 6)


def _draw_legend(page: Page, chart: Chart, entries: list[tuple[Series, str]], legend: _Legend,
                 left: float, bottom: float, width: float, height: float) -> None:
    """A white box of the series' samples and labels, in a corner of the axes."""
    sample = LEGEND_SAMPLE
    box_left = left + 4 if chart.legend.endswith("left") else left + width - 4 - legend.width
    box_bottom = (bottom + height - 4 - legend.height if chart.legend.startswith("upper")
                  else bottom + 4)
    page.rectangle(box_left, box_bottom, legend.width, legend.height, stroke="#cccccc",
                   fill="#ffffff", line_width=0.5)
    for number, (series, colour) in enumerate(entries):
        column, line = number % legend.columns, number // legend.columns
        x = box_left + 6 + column * legend.column_width
        y = box_bottom + legend.height - 3 - (line + 0.5) * LEGEND_ROW
        if series.line or series.errors is not None:
            page.lines([(x, y), (x + sample, y)], colour=colour, width=1.3, dashed=series.dashed)
        if series.marker_radius:
            page.markers([(x + sample / 2, y)], colour=colour, radius=series.marker_radius)
        page.text(x + sample + LEGEND_GAP, y - 2.2, series.label, size=LEGEND_SIZE)


# --- Ticks --------------------------------------------------------------------------------------


def linear_axis(
    values: Sequence[float], *, label: str = "", low: float | None = None,
    high: float | None = None, ticks: Sequence[float] | None = None, most_ticks: int = 6,
) -> Axis:
    """An axis over `values` with a margin of 5% (or from `low` to `high`), ticked at round
    numbers (or at `ticks`)."""
    finite = [v for v in values if not math.isnan(v)]
    if low is None or high is None:
        smallest, largest = (min(finite), max(finite)) if finite else (0.0, 1.0)
        if smallest == largest:
            smallest, largest = smallest - 0.5, largest + 0.5
        margin = (largest - smallest) * 0.05
        low = smallest - margin if low is None else low
        high = largest + margin if high is None else high
    if ticks is None:
        step = _round_step((high - low) / max(most_ticks - 1, 1))
        first = math.ceil(low / step - 1e-9)
        ticks = [n * step for n in range(first, math.floor(high / step + 1e-9) + 1)]
    decimals = next(  # the fewest decimal places that write every tick exactly
        (d for d in range(7) if all(abs(round(t, d) - t) <= 1e-9 * max(1.0, abs(t)) for t in ticks)),
        6,
    )
    return Axis(low, high, tuple((t, f"{t:.{decimals}f}") for t in ticks), label)


def _round_step(rough: float) -> float:
    """The round number (1, 2, 2.5 or 5 times a power of ten) nearest above `rough`."""
    power = 10 ** math.floor(math.log10(rough)) if rough > 0 else 1.0
    for multiple in (1, 2, 2.5, 5, 10):
        if multiple * power >= rough * (1 - 1e-9):
            return multiple * power
    return 10 * power


# Steps a time axis may be ticked at, smallest first.
TIME_STEPS = (
    timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=5), timedelta(minutes=10),
    timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1), timedelta(hours=2),
    timedelta(hours=3), timedelta(hours=6), timedelta(hours=12), timedelta(days=1),
    timedelta(days=2), timedelta(days=7), timedelta(days=14), timedelta(days=30),
    timedelta(days=91), timedelta(days=365),
)


def time_axis(start: datetime, end: datetime, *, most_ticks: int = 6, label: str = "") -> Axis:
    """An axis from `start` to `end` (seconds since the epoch as values), ticked at round times.

    Labels say what changes: hours and minutes within a day (the first tick also the day), days
    within a year, months and years beyond.
    """
    span = end - start
    step = next((s for s in TIME_STEPS if span / s <= most_ticks - 1), TIME_STEPS[-1])
    epoch = datetime(2000, 1, 3, tzinfo=start.tzinfo)  # a Monday: weeks tick on Mondays
    first = epoch + step * math.ceil((start - epoch) / step)
    ticks = []
    moment = first
    while moment <= end:
        ticks.append(moment)
        moment += step
    if step < timedelta(days=1):
        labels = [f"{t:%H:%M}" if n and t.date() == ticks[n - 1].date() else f"{t:%d %b %H:%M}"
                  for n, t in enumerate(ticks)]
    elif step < timedelta(days=30):
        labels = [f"{t:%d %b}" if n and t.year == ticks[n - 1].year else f"{t:%d %b %Y}"
                  for n, t in enumerate(ticks)]
    else:
        labels = [f"{t:%b %Y}" for t in ticks]
    return Axis(start.timestamp(), end.timestamp(),
                tuple((t.timestamp(), text) for t, text in zip(ticks, labels, strict=True)), label)
