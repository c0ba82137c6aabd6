"""The `univigu` command line: the entry point (:mod:`service.cli.main`), `univigu submit` (an HTTP
client of the gateway), and `univigu up` with the local redis-server it may start.

This is the one place that composes the gateway, the worker and the model's own commands; it imports
each of them only when its command runs, so `univigu gateway` never loads torch.
"""
