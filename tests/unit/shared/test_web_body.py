"""One way to name an invalid field in every service's 422: ``items[2].name``, ``$``."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from services.shared.jsonbody import DuplicateKey
from services.shared.problems import MalformedRequest, ValidationFailed
from services.shared.web.body import parse_json_model


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Item]


def fields(body: bytes) -> list[str]:
    with pytest.raises(ValidationFailed) as refused:
        parse_json_model(body, Body, "request body")
    return [error.field for error in refused.value.errors]


def test_list_items_are_named_by_index_in_brackets() -> None:
    # gateway_auth used to say items.2.name; the API always said items[2].name.
    assert fields(b'{"items": [{"name": "a"}, {"name": "b"}, {"name": 3}]}') == ["items[2].name"]


def test_the_whole_body_is_named_dollar() -> None:
    # gateway_auth used to say "body".
    assert fields(b"[]") == ["$"]


def test_unknown_keys_and_missing_fields_are_named_where_they_are() -> None:
    assert sorted(fields(b'{"items": [{"nam": "a"}], "x": 1}')) == [
        "items[0].nam",
        "items[0].name",
        "x",
    ]


def test_a_repeated_key_and_a_non_json_body_are_400() -> None:
    # gateway_auth answered a body that is not JSON with 422 before; the edge's WAF
    # refuses most such bodies first, so this is checked here, not through the edge.
    with pytest.raises(DuplicateKey):
        parse_json_model(b'{"items": [], "items": []}', Body, "request body")
    with pytest.raises(MalformedRequest) as refused:
        parse_json_model(b"{not json", Body, "request body")
    assert refused.value.status == 400
    assert "not valid JSON" in refused.value.detail


def test_a_valid_body_is_the_model() -> None:
    assert parse_json_model(b'{"items": [{"name": "a"}]}', Body, "request body") == Body(
        items=[Item(name="a")]
    )
