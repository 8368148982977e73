"""Load tests and benchmarks for the served CXR-LT pipeline.

- `locustfile.py`: a locust User calling cxr_classifier / cxr_zeroshot / cxr_findings over gRPC.
- `runner.py`: `cxrlt loadtest`, locust headless + Triton's Prometheus metrics + target checks.
- `bench.py`: `cxrlt bench`, the served pipeline against the same pipeline run in process.
- `payloads.py`, `metrics.py`, `targets.py`: what they share.

Nothing here is imported by the server or by the other CLI commands at start-up.
"""
