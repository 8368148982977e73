"""One module per `cxrlt` subcommand: `add_arguments(parser)` and `run(args) -> int`.

Modules import their heavy dependencies (torch, tritonclient, locust) inside `run`, so
`cxrlt --help` stays fast.
"""
