"""Parsing of custom Ray resources (``--actor-resource``, ``--worker-resource``)."""

from __future__ import annotations

import pytest

from alm_pipeline.pipeline.ray_utils import parse_resources


def test_resources_are_parsed_into_amounts():
    assert parse_resources("--x", ()) == {}
    assert parse_resources("--x", ("accel=1", "node_type:gpu=0.5")) == {"accel": 1.0, "node_type:gpu": 0.5}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (("accel",), "--x must be NAME=AMOUNT with AMOUNT > 0, got 'accel'"),
        (("accel=0",), "got 'accel=0'"),
        (("accel=-1",), "got 'accel=-1'"),
        (("accel=nan",), "got 'accel=nan'"),
        (("accel=inf",), "got 'accel=inf'"),
        (("=1",), "got '=1'"),
        (("CPU=2",), "CPUs and GPUs have their own options"),
        (("accel=1", "accel=2"), "resource 'accel' given twice"),
    ],
)
def test_bad_resources_are_refused_by_option_name(items, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_resources("--x", items)
