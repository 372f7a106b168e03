"""The built-in recipes, one per model of the paper (Tables 3, 5 and 6)."""
from __future__ import annotations

from leanconv.recipes.registry import Recipe, register
from leanconv.recipes.spec import Bottleneck, LayerSpec, Method

# expected_ratio: MACs of a converted n->n stride-1 3x3 layer over the dense layer, n = 256 at
# 16x16 (tests/test_recipes.py recomputes each one). Formulas, per output pixel, with d = 9n^2:
#   unravel-b4          4(9n + n^2) / d               = 4/9 + 4/n
#   sic-m2              2(9n + n^2) / d               = 2/9 + 2/n
#   sic5-m2             2(25n + n^2) / d              = 2/9 + 50/(9n)
#   sic-m3              3(9n + n^2) / d               = 1/3 + 3/n
#   topo2d / topo3d     2 * c/n (Table 4: 64/256, 60/256)
#   group4              2 * 1/4
#   sic-topo2d          4(9n + n^2/4) / d             = 1/9 + 4/n
#   sic-bottleneck(-half): a bottleneck layer costs (2*4n + n^2) per reduced pixel; the one-pixel
#   offset layer has (h/2 + 1)^2 reduced pixels at even h, so both are a little over n^2/4.
BUILTIN = [
    Recipe("unravel-b4", "depthwise x4 + 1x1 projection, SVD start (paper model B)",
           LayerSpec(Method.UNRAVEL, multiplier=4), paper_model="B", expected_ratio=0.460069),
    Recipe("sic-m2", "two SIC layers per 3x3 conv (paper model C)",
           LayerSpec(Method.SIC, kernel=3, depth=2), paper_model="C", expected_ratio=0.230035),
    Recipe("sic5-m2", "two SIC layers with 5x5 depthwise filters (paper model D)",
           LayerSpec(Method.SIC, kernel=5, depth=2), paper_model="D", expected_ratio=0.243924),
    Recipe("sic-m3", "three SIC layers per 3x3 conv (paper model E)",
           LayerSpec(Method.SIC, kernel=3, depth=3), paper_model="E", expected_ratio=0.345052),
    Recipe("topo2d", "two 2-D topological 3x3 convs, 1/4 of the connections each (paper model F)",
           LayerSpec(Method.TOPO, depth=2, topology=2), paper_model="F", expected_ratio=0.5),
    Recipe("topo3d", "two 3-D topological 3x3 convs, 15/64 of the connections each (paper model G)",
           LayerSpec(Method.TOPO, depth=2, topology=3), paper_model="G", expected_ratio=0.46875),
    Recipe("group4", "two 3x3 convs with 4 groups each, the grouping baseline (paper model H)",
           LayerSpec(Method.GROUP, depth=2, groups=4), paper_model="H", expected_ratio=0.5),
    Recipe("sic-topo2d", "four SIC layers with 2-D topological projections (paper model I)",
           LayerSpec(Method.SIC, kernel=3, depth=4, topology=2), paper_model="I", expected_ratio=0.126736),
    Recipe("sic-bottleneck-half", "a SIC layer and a spatial-bottleneck pair (paper model J)",
           LayerSpec(Method.SIC, kernel=3, depth=2, bottleneck=Bottleneck.HALF), paper_model="J",
           expected_ratio=0.179918),
    Recipe("sic-bottleneck", "two spatial-bottleneck pairs (paper model K)",
           LayerSpec(Method.SIC, kernel=3, depth=2, bottleneck=Bottleneck.FULL), paper_model="K",
           expected_ratio=0.129801),
]

for _recipe in BUILTIN:
    register(_recipe)
