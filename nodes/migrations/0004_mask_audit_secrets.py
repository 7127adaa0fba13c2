"""Mask passwords in URLs already stored in the audit trail (a control plane's Redis URL, a NanoCtrl
address): records written from now on are masked when they are written (``nodes.services.audit``).
Masking cannot be undone, so going back leaves the records as they are."""

from __future__ import annotations

from django.db import migrations

from nodes.masking import mask_credentials


def _masked(value):
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, list):
        return [_masked(item) for item in value]
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    return value


def mask_audit_trail(apps, schema_editor) -> None:
    ChangeRecord = apps.get_model("nodes", "ChangeRecord")
    for record in ChangeRecord.objects.filter(object_type="controlplane").iterator():
        masked = _masked(record.changes)
        if masked != record.changes:
            record.changes = masked
            record.save(update_fields=["changes"])


class Migration(migrations.Migration):
    dependencies = [("nodes", "0003_node_consecutive_successes")]

    operations = [migrations.RunPython(mask_audit_trail, migrations.RunPython.noop)]
