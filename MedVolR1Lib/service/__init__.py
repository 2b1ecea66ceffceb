"""Model work outside the caller's process: one protocol spoken by a local worker process and an HTTP server.

Slicer's main thread never releases the GIL, so models must not run on a Python thread inside Slicer.
`client.WorkerClient` starts `python -m MedVolR1Lib.service.worker`, which connects back over loopback;
`remote.RemoteClient` talks to `medvolr1 serve` (server.py) over HTTP.  Both return the same `Job`,
which the GUI thread pumps with non-blocking reads from `poll()`.
"""
