"""The README documents every config key and every API route, so neither can be added unseen."""

from __future__ import annotations

import re

import pytest

from app import create_app
from conftest import PROJECT_DIR
from settings import REQUIRED_PATH_KEYS, SECTIONS, Schema

CONFIG_KEYS = [
    *REQUIRED_PATH_KEYS,
    "log_path",
    *(f"schema.{key}" for key in Schema._fields),
    *(f"{section}.{key}" for section, options in SECTIONS.items() for key in options._fields),
]


@pytest.fixture(scope="module")
def readme() -> str:
    return (PROJECT_DIR / "README.md").read_text(encoding="utf-8")


def section(readme: str, heading: str) -> str:
    """The text of one `## heading` section of the README, up to the next `## ` heading."""
    found = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert found, f"the README has no section '## {heading}'"
    return found.group(1)


def test_readme_config_section_documents_every_config_key(readme):
    documented = section(readme, "config.json")

    undocumented = [key for key in CONFIG_KEYS if f"`{key}`" not in documented]

    assert undocumented == []


def test_readme_api_section_documents_every_route(readme, workspace):
    url_map = create_app(workspace).url_map
    routes = [
        f"{method} {rule.rule}"
        for rule in url_map.iter_rules() if rule.endpoint != "static"
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
    ]
    documented = section(readme, "API")

    # As the Endpoints table writes them: `GET /risk?top=N`, `POST /prediction`.
    undocumented = [
        route for route in routes if not re.search(f"`{re.escape(route)}[`?]", documented)
    ]

    assert "POST /prediction" in routes
    assert undocumented == []
