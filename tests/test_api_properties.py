"""Whatever JSON a client sends to POST /prediction, the answer is predictions or a client error.

A property test: Hypothesis generates bodies (any JSON value, records with odd cells, file names
with odd text) and every answer must be a 200 with predictions or a 4xx with a message, never a
500.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import FILE_KEYS, create_app
from settings import load_settings

COLUMNS = ["corporation", "lastmonth_activity", "lastyear_activity", "number_of_employees"]


@pytest.fixture(scope="module")
def client(_deployed_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("properties") / "workspace"
    shutil.copytree(_deployed_template, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RISK_API_TOKEN", raising=False)
        app = create_app(load_settings(root / "config.json"))
    app.testing = True
    return app.test_client()


scalars = (
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.text(max_size=20) | st.text(st.characters(codec="utf-8"), max_size=5)
    | st.sampled_from(["", "  ", "12", "-3", "4.5", "1e400", "NaN", "null", "1" * 400,
                       "\ud800", "testdata/testdata.csv", "../config.json"])
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                         max_size=4),
    max_leaves=12,
)
records = st.fixed_dictionaries(
    {column: scalars for column in COLUMNS}, optional={"exited": scalars, "extra": json_values}
)
file_names = st.one_of(
    st.text(max_size=40),
    st.builds(lambda folder, name: folder + name,
              st.sampled_from(["", "testdata/", "sourcedata/", "ingesteddata/", "/", "/dev/",
                               "../", "testdata/../", "models/", "./testdata/"]),
              st.text(max_size=30).map(lambda text: text + ".csv")),
    json_values,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"records": st.lists(records | json_values, max_size=4)}),
    st.sampled_from(FILE_KEYS).flatmap(
        lambda key: st.fixed_dictionaries({key: file_names})),
    st.dictionaries(st.sampled_from(["records", *FILE_KEYS, "other"]), json_values, max_size=3),
)


@given(body=bodies)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_body_is_answered_with_predictions_or_a_client_error(client, body):
    response = client.post(
        "/prediction", data=json.dumps(body), content_type="application/json"
    )

    if response.status_code == 200:
        assert len(response.json["predictions"]) == len(response.json["ids"]) > 0
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.json)
        assert response.json["error"]
