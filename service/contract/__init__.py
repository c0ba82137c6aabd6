"""The job contract: everything the gateway and the workers share, and nothing else.

- :mod:`~service.contract.settings`: the one settings object, read from ``UNIVIGU_*``.
- :mod:`~service.contract.schemas`: job records, the request parameters and the served model's
  description, validated the same way on both sides.
- :mod:`~service.contract.store`: job records in Redis and their atomic status transitions.
- :mod:`~service.contract.queue`: the rq queue, filled by the gateway by dotted path.
- :mod:`~service.contract.result_files`: where a job's files live and how expired ones go.
- :mod:`~service.contract.connection`: Redis clients and the components built on them.
- :mod:`~service.contract.metrics`: every Prometheus metric of both processes.
- :mod:`~service.contract.errors`: the service side's domain errors.

It imports neither FastAPI nor torch; its only model import is the torch-free rule set
(:mod:`model.limits`). ``tests/test_import_boundaries.py`` keeps it that way.
"""
