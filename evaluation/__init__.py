"""Evaluating a built repository: the in-process reference pipeline, `cxrlt evaluate` and the
ensemble weight search (`cxrlt tune-weights`)."""
