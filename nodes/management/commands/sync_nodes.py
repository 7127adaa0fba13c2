"""Mirror the NanoCtrl registries into the node table now (the same service beat runs)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.models import ControlPlane
from nodes.services import registry_sync


class Command(BaseCommand):
    help = "Sync nodes from every enabled control plane (or the ones named)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("control_planes", nargs="*", help="Control plane names or ids (default: all enabled).")

    def handle(self, *args: object, control_planes: list[str], **options: object) -> None:
        if control_planes:
            selected = []
            for ref in control_planes:
                found = ControlPlane.objects.filter(name=ref).first() or (
                    ControlPlane.objects.filter(pk=int(ref)).first() if ref.isdigit() else None
                )
                if found is None:
                    raise CommandError(f"No control plane named or numbered {ref!r}.")
                selected.append(found)
        else:
            selected = list(ControlPlane.objects.filter(enabled=True))
        failed = False
        for control_plane in selected:
            result = registry_sync(control_plane_id=control_plane.pk)
            self.stdout.write(f"{control_plane.name}: {result.summary()}")
            for problem in result.problems:
                self.stdout.write(f"  {problem}")
            failed |= not (result.ok or result.skipped)
        if failed:
            raise CommandError("at least one control plane failed to sync")
