"""Serving Uni-ViGU: the job contract (:mod:`service.contract`) that the gateway
(:mod:`service.gateway`) and the workers (the top-level ``worker`` package) share, the Python client
(:mod:`service.client`), and the command line (:mod:`service.cli`)."""
