"""rq workers that load the Uni-ViGU pipeline once and run jobs in-process (no fork per job).

Start one per GPU with `univigu worker --device cuda:0 ...`; see worker.main.
"""
