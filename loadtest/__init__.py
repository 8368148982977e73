"""Load tests and benchmarks for the served CXR-LT pipeline.

- `locustfile.py`: a locust User calling cxr_classifier / cxr_zeroshot / cxr_findings over gRPC.
- `runner.py`: `cxrlt loadtest`, locust headless + Triton's Prometheus metrics + target checks.
- `kernel.py`: what the others share: requests, measurements, checks, process sampling, output.
- `bench.py`: `cxrlt bench`, the served pipeline against the same pipeline run in process (no torch).
- `driver.py`: `cxrlt stress` and `cxrlt soak`, two modes of one driver.
- `payloads.py`, `metrics.py`, `targets.py`: the images, Triton's metrics, load-test targets.

Nothing here is imported by the server or by the other CLI commands at start-up.
"""
