"""The Batch API: inference jobs over large datasets (Cortex's contract, issue 7).

A job is submitted to a ``kind: BatchAPI`` endpoint, split into batches that
wait in a durable queue in the state store, and run by worker processes
started for the job (none run when no job does). Modules, one job each:

- ``statuses``  the job statuses and their Cortex names
- ``spec``      validating a submission against Cortex's keys and the API's limits
- ``globs``     Cortex's include/exclude glob patterns
- ``sources``   item lists, file listings and JSON-lines files, streamed into batches
- ``output``    the optional output sink (atomic per batch, duplicate-free on retries)
- ``runner``    in a worker: the user's PythonPredictor, or the API's model pipeline
- ``worker``    the worker process: claim, run, acknowledge, on_job_complete
- ``joblog``    each job's JSON-lines log
- ``job``       in the server: one job's enqueuer, workers and watchdog
- ``manager``   in the server: every batch API and job; what HTTP routes call
- ``report``    the status document (Cortex's shape, plus progress and ETA)
"""
