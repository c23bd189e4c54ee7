"""The report's PDF writer: pages any reader opens, text that reads back, charts with round ticks."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pypdf
import pytest

import reportpdf

CREATED = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def document_with(*lines: str) -> reportpdf.Document:
    document = reportpdf.Document("A title (with brackets)", CREATED)
    page = document.new_page()
    for number, line in enumerate(lines):
        page.text(40, 800 - 12 * number, line, size=9)
    return document


def test_a_document_reads_back_with_its_text_title_and_date():
    document = document_with("plain text", r"brackets (a) and a backslash \ here", "ünïcödé")
    document.new_page().text(40, 800, "second page", size=9, font="Helvetica-Bold")

    reader = pypdf.PdfReader(io.BytesIO(document.to_bytes()))

    assert len(reader.pages) == 2
    first = reader.pages[0].extract_text()
    assert "plain text" in first
    assert r"brackets (a) and a backslash \ here" in first
    assert "ünïcödé" in first  # Windows-1252 holds it
    assert reader.pages[1].extract_text().strip() == "second page"
    assert reader.metadata.title == "A title (with brackets)"
    assert reader.metadata.creation_date == CREATED


def test_text_outside_the_fonts_encoding_is_written_as_question_marks():
    reader = pypdf.PdfReader(io.BytesIO(document_with("minus \u2212 and 漢字").to_bytes()))

    assert "minus ? and ??" in reader.pages[0].extract_text()


def test_the_same_pages_give_the_same_bytes():
    assert document_with("a line").to_bytes() == document_with("a line").to_bytes()


def test_a_chart_draws_its_title_ticks_axis_labels_and_legend():
    document = reportpdf.Document("charts", CREATED)
    page = document.new_page()
    chart = reportpdf.Chart(
        "ROC curve",
        reportpdf.linear_axis((), low=0, high=1, ticks=(0, 0.25, 0.5, 0.75, 1), label="rate"),
        reportpdf.linear_axis([0.1, 0.9], label="share"),
        series=[
            reportpdf.Series("model", [(0, 0), (0.5, float("nan")), (1, 1)]),
            reportpdf.Series("point", [(0.5, 0.5)], line=False, marker_radius=3,
                             errors=[(0.4, 0.6)]),
        ],
        legend="lower right",
        grid=True,
    )

    reportpdf.draw_chart(page, chart, 60, 400, 200, 200)

    text = pypdf.PdfReader(io.BytesIO(document.to_bytes())).pages[0].extract_text()
    for expected in ("ROC curve", "0.00", "0.25", "1.00", "rate", "share", "model", "point"):
        assert expected in text


def test_a_chart_without_data_says_why_instead():
    document = reportpdf.Document("charts", CREATED)
    empty = reportpdf.Axis(0.0, 1.0, ())
    reportpdf.draw_chart(document.new_page(),
                         reportpdf.Chart("Stage timings", empty, empty, message="no runs yet"),
                         60, 400, 200, 200)

    text = pypdf.PdfReader(io.BytesIO(document.to_bytes())).pages[0].extract_text()

    assert "Stage timings" in text and "no runs yet" in text


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 1.0], ["0.00", "0.25", "0.50", "0.75", "1.00"]),
        ([0.12, 0.93], ["0.2", "0.4", "0.6", "0.8"]),
        ([3, 97], ["0", "25", "50", "75", "100"]),
        ([5.0, 5.0], ["4.50", "4.75", "5.00", "5.25", "5.50"]),  # one value: a unit around it
    ],
)
def test_linear_ticks_fall_on_round_numbers_written_with_the_places_they_need(values, expected):
    axis = reportpdf.linear_axis(values)

    assert [label for _, label in axis.ticks] == expected
    assert axis.low < min(values) and axis.high > max(values)  # a margin either side
    assert all(axis.low <= value <= axis.high for value, _ in axis.ticks)


def test_time_ticks_within_a_day_name_the_day_once_then_the_time():
    start = datetime(2026, 11, 26, 7, 50, tzinfo=UTC)

    axis = reportpdf.time_axis(start, start + timedelta(minutes=40))

    labels = [label for _, label in axis.ticks]
    assert labels == ["26 Nov 07:50", "08:00", "08:10", "08:20", "08:30"]


def test_time_ticks_over_weeks_are_days():
    start = datetime(2026, 11, 1, 12, tzinfo=UTC)

    axis = reportpdf.time_axis(start, start + timedelta(days=20))

    labels = [label for _, label in axis.ticks]
    assert 2 <= len(labels) <= 6
    assert labels[0].endswith("2026") and all(len(label) == 6 for label in labels[1:])
    assert axis.low == start.timestamp() and axis.high == (start + timedelta(days=20)).timestamp()
