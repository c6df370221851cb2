"""`export --to merged`: a plain Hugging Face folder whose logits are the applied structure's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from petlsearch.errors import StructureError
from petlsearch.plugins import create_plugin, plugins_for
from petlsearch.runners.export import export_merged
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.structure import Structure

MERGEABLE = ("lora", "bitfit", "ia3", "fish_mask", "dsee", "kadaptation")


@pytest.fixture()
def task(tmp_path):
    """Rotten Tomatoes on a tiny BERT saved as a local model folder (with MiniLM's real tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from petlsearch.runners import data as D
    from petlsearch.runners.tasks import get_task

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(D.minilm_path())
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path / "tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return get_task("rotten_tomatoes", model=str(folder), limit=64)


def _trained(task, names, tmp_path, roles=("attn.q", "attn.v", "ffn.down")):
    """One placement of each plugin, built as a search's final run builds it, every trainable moved off
    its init, saved as a run folder holds it (structure.yaml, weights, head)."""
    from safetensors.torch import save_file

    from petlsearch.runners.trial import fresh_backbone

    plugins = {n: create_plugin(n) for n in names}
    space = SearchSpace.from_graph(ModelGraph.from_model(task.make_model()), list(plugins.values()), roles=roles,
                                   layers=[1])
    first = {}
    for c in space.candidates:
        first.setdefault(c.plugin, c.placement(c.min_config))
    placements = list(first.values())
    model, _, applied, _ = fresh_backbone(task, placements, plugins, seed=0, batch_size=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*applied.parameters(), *model.classifier.parameters()]:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    applied.save_weights(tmp_path / "weights.safetensors")
    save_file({f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    structure = space.structure(placements, result={"seed": 0})
    structure.train = {"batch_size": 16}
    return model.eval(), structure, structure.save(tmp_path / "structure.yaml")


def _logits(model, tokenizer):
    batch = tokenizer(["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate cliches"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_every_mergeable_plugin_folds_into_a_plain_folder_with_the_same_logits(task, tmp_path) -> None:
    model, structure, path = _trained(task, MERGEABLE, tmp_path)
    assert {p.plugin for p in structure.placements} == set(MERGEABLE)
    expected = _logits(model, task.tokenizer)
    out = export_merged(structure, path, task, out=tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # loaded by transformers alone, in a process that never imports petlsearch
    code = ("import sys, json, torch; from transformers import AutoModelForSequenceClassification as A, "
            "AutoTokenizer as T; m = A.from_pretrained(sys.argv[1]).eval(); t = T.from_pretrained(sys.argv[1]); "
            "b = t(['a gorgeous, witty, seductive movie.', 'the plot is nothing but boilerplate cliches'], "
            "padding=True, return_tensors='pt'); assert 'petlsearch' not in sys.modules; "
            "print(json.dumps(m(**b).logits.tolist()))")
    got = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    logits = torch.tensor(__import__("json").loads(got.stdout.strip().splitlines()[-1]))
    assert (logits - expected).abs().max() < 1e-5
    assert (logits - _logits(task.make_model().eval(), task.tokenizer)).abs().max() > 1e-2  # it did change


def test_placements_that_cannot_merge_are_named_or_kept_beside_with_partial(task, tmp_path) -> None:
    model, structure, path = _trained(task, ("lora", "adapter"), tmp_path, roles=None)
    expected = _logits(model, task.tokenizer)
    with pytest.raises(StructureError, match=r"cannot merge.*@adapter.*--partial"):
        export_merged(structure, path, task, out=tmp_path / "merged")
    out = export_merged(structure, path, task, out=tmp_path / "merged", partial=True)
    rest = Structure.load(out / "structure.yaml")
    assert [p.plugin for p in rest.placements] == ["adapter"]
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    applied = rest.apply(merged, plugins_for(rest))
    applied.load_weights(out / "weights.safetensors")
    assert (_logits(merged, task.tokenizer) - expected).abs().max() < 1e-5
