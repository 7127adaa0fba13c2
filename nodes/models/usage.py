"""Usage rolled up per hour: what the web workers counted per API key, model and node each minute
(``nodes.live.usage``), summed into one row per hour by ``services.usage_rollup``. Bookkeeping, not
configuration: written without audit records or a configuration version."""

from __future__ import annotations

from django.db import models


class UsageHour(models.Model):
    """One API key's use of one model on one node in one hour (UTC). ``key_id`` 0 is requests made
    without a key; ``key_name`` is the key's name when the row was written (a deleted key's rows stay).
    """

    hour = models.DateTimeField(help_text="The hour's start (UTC).")
    key_id = models.PositiveIntegerField(help_text="The API key's id; 0 for requests without a key.")
    key_name = models.CharField(max_length=100, blank=True)
    model = models.CharField(max_length=255, help_text="The model the clients asked for.")
    node = models.CharField(max_length=1000, help_text="The node that answered (a PD pair: both); - for none.")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    ttft_ms_sum = models.BigIntegerField(default=0, help_text="Sum of the streams' times to first token.")
    ttft_count = models.BigIntegerField(default=0, help_text="Streams whose time to first token is in the sum.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "usage (hourly)"
        verbose_name_plural = "usage (hourly)"
        ordering = ["-hour", "model", "key_id", "node"]
        constraints = [
            models.UniqueConstraint(fields=["hour", "key_id", "model", "node"], name="usage_hour_unique"),
        ]
        indexes = [models.Index(fields=["model", "hour"]), models.Index(fields=["key_id", "hour"])]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.model} key {self.key_id} on {self.node}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def mean_ttft_ms(self) -> float | None:
        return self.ttft_ms_sum / self.ttft_count if self.ttft_count else None
