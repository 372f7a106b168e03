"""Graph passes: analyze a model, select convs, swap in replacements; fx tracing with leaf layers."""
from leanconv.passes.analyze import ConvSite, ModelFacts, analyze
from leanconv.passes.candidates import Candidate, select_candidates
from leanconv.passes.rewrite import replace_modules
from leanconv.passes.trace import LeafTracer, trace

__all__ = ["Candidate", "ConvSite", "LeafTracer", "ModelFacts", "analyze", "replace_modules",
           "select_candidates", "trace"]
