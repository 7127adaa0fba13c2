"""Roll the web workers' per-minute usage up into hourly rows now (the service beat runs every five
minutes; docs/usage.md)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from nodes.services import usage_rollup


class Command(BaseCommand):
    help = "Sum the current and the previous hour's usage minutes (Redis) into UsageHour rows."

    def handle(self, *args: object, **options: object) -> None:
        written = usage_rollup()
        if written is None:
            raise CommandError("Redis cannot be read; nothing was rolled up")
        self.stdout.write(f"{written} hourly usage row(s) written")
