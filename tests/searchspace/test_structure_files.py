"""Structure files: validation with clear errors, hostile input, backbone mismatches."""

from __future__ import annotations

import pytest

from petlsearch.errors import StructureError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins import plugins_for
from petlsearch.searchspace.structure import Structure

GOOD = """petlsearch_structure: 1
backbone: {name: tiny, family: bert, num_parameters: 1, fingerprint: ''}
placements:
  - {site: "encoder.L0.attn.q:weight", plugin: lora, config: {rank: 2}}
"""


def load_text(tmp_path, text: str) -> Structure:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return Structure.load(path)


def test_good_file_applies(tmp_path) -> None:
    s = load_text(tmp_path, GOOD)
    applied = s.apply(tiny.bert(), plugins_for(s))
    assert applied.trainable_count() == 2 * (32 + 32)


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['echo pwned']", "not valid YAML"),
    ("petlsearch_structure: 1\nplacements: 3\n", "must be a list"),
    ("petlsearch_structure: 2\nplacements: []\n", "must be 1"),
    ("- a\n- b\n", "expected a mapping"),
    (GOOD.replace("rank: 2", "rank: .inf"), "unsupported value"),
    (GOOD.replace("rank: 2", "rank: 100000000000000000000000"), "unsupported value"),
    (GOOD.replace("plugin: lora", "plugin: 7"), "plugin must be a non-empty string"),
    (GOOD[: len(GOOD) // 2] + "[", "not valid YAML"),
    (GOOD.replace("num_parameters: 1", "num_parameters: many"), "must be int"),
])
def test_malformed_or_hostile_files_are_clean_errors(tmp_path, text: str, message: str) -> None:
    with pytest.raises(StructureError, match=message):
        load_text(tmp_path, text)


def test_errors_name_the_line(tmp_path) -> None:
    with pytest.raises(StructureError, match=r"s\.yaml:4"):
        load_text(tmp_path, GOOD.replace("config: {rank: 2}", "config: [1, 2]"))


def test_bad_config_and_missing_site_name_the_placement(tmp_path) -> None:
    with pytest.raises(StructureError, match="encoder.L0.attn.q:weight@lora.*outside"):
        bad = load_text(tmp_path, GOOD.replace("rank: 2", "rank: 100000"))
        bad.apply(tiny.bert(), plugins_for(bad))
    with pytest.raises(StructureError, match="no site 'encoder.L9.attn.q:weight'"):
        bad = load_text(tmp_path, GOOD.replace("L0", "L9"))
        bad.apply(tiny.bert(), plugins_for(bad))


def test_fingerprint_mismatch_and_force(tmp_path) -> None:
    from petlsearch.searchspace.graph import ModelGraph

    fp = ModelGraph.from_model(tiny.bert()).fingerprint()
    s = load_text(tmp_path, GOOD.replace("fingerprint: ''", f"fingerprint: '{fp}'"))
    with pytest.raises(StructureError, match="Pass force=True"):
        s.apply(tiny.bert(layers=3), plugins_for(s))
    assert s.apply(tiny.bert(layers=3), plugins_for(s), force=True).trainable_count() == 128
