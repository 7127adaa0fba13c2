"""What the tests that run real processes share, each in one place:

- ``stack.py``: the process-stack factory. ``StackPool.get(StackSpec(...))`` (the session's
  ``stacks`` fixture) runs RouterPanel's processes (web under uvicorn or daphne, Celery worker and
  beat, the registry listener, the prober, NanoCtrl, Redis) on free ports with a fresh database, shared by
  every test that asks for an equal spec; ``RouterPanelStack`` configures one over REST.
- ``wait.py``: ``wait_until(condition, timeout, message)`` and ``wait_until_async``: poll a
  condition, return its value, fail with the message. Never sleep and hope.
- ``ports.py``: ``free_port()``, ``free_port_block(n)`` and ``closed_port()``; no test assumes a
  fixed port is free or closed.
- ``procs.py``: command lines (``web_argv``, ``celery_argv``, ``listener_argv``, ``prober_argv``,
  ``nanoctrl_argv``),
  ``running(argv, port=...)``, which starts a process and stops it with its process group, and
  ``RedisServer`` and ``NanoCtrl``, which a test may stop and start again on the same port.
"""
