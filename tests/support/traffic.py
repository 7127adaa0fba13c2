"""A client sending ``/v1`` requests back to back, for tests and benchmarks that watch a fleet
under load and count what came back."""

from __future__ import annotations

import threading
from collections import Counter

import httpx


class Traffic(threading.Thread):
    """One client sending requests back to back, counting the answers by status and error code."""

    def __init__(self, base: str, model: str, key: str) -> None:
        super().__init__(daemon=True)
        self.base, self.model, self.key = base, model, key
        self.stop = threading.Event()
        self.answers: Counter[str] = Counter()

    def run(self) -> None:
        body = {"model": self.model, "prompt": "hello", "max_tokens": 4}
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    self.answers[exc.__class__.__name__] += 1
                    continue
                code = "" if response.status_code == 200 else response.json()["error"]["code"]
                self.answers[f"{response.status_code} {code}".strip()] += 1
