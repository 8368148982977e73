"""Load tests and benchmarks of the served CXR-LT pipeline (loadtest/README.md); nothing here is imported
by the server or by the other CLI commands at start-up."""
