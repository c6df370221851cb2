"""Bottleneck adapters: Houlsby (sequential) and the unified view's parallel / scaled parallel adapter.

Houlsby et al. insert h -> h + up(act(down(h))) after the attention and FFN sublayers; He et al.
("Towards a Unified View of Parameter-Efficient Transfer Learning") show that the same bottleneck
placed in parallel to a sublayer (out = f(x) + s * up(act(down(x)))) with a scale s works better,
especially on the FFN. The up-projection starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

from petlsearch.plugins.parts.bottleneck import BottleneckPlugin, ParallelAdapterModule
from petlsearch.searchspace.dims import Dim, FloatDim
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site


class HoulsbyAdapter(BottleneckPlugin):
    name = "adapter"
    description = "Bottleneck adapter after the attention and FFN sublayers (sequential)"
    paper = "Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019"
    kinds = ("sequential",)
    recipe = Recipe(lr=1e-3, source=(
        "Houlsby et al. tune 3e-5..3e-3; 1e-3 at every site of MiniLM, 100 steps: 0.717 test accuracy over 3 "
        "seeds, where 1e-2 stayed at the majority class (python -m bench --only zoo)"))


class ParallelAdapter(BottleneckPlugin):
    name = "parallel_adapter"
    description = "Bottleneck adapter in parallel to a sublayer, output scaled by s (unified view)"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    kinds = ("parallel",)
    recipe = Recipe(lr=1e-3, source=(
        "as Houlsby adapters: 1e-3 at every site of MiniLM, 100 steps (python -m bench --only zoo); He et al."
        " use 1e-4..5e-4 over epochs"))
    module_class = ParallelAdapterModule

    @staticmethod
    def input_features(site: Site) -> int:
        """A parallel adapter reads the sublayer's input."""
        return site.in_features

    def dims(self, site: Site) -> dict[str, Dim]:
        dims = super().dims(site)
        dims["scaling"] = FloatDim("scaling", default=4.0, low=0.1, high=16.0, log=True,
                                   help="scale s of the branch's output (1 = unscaled parallel adapter)")
        return dims
