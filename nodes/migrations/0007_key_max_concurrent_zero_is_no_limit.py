"""max_concurrent=0 on an API key meant "no request at all", while max_concurrency=0 on a node means
no limit. From here on 0 means no limit on both (nodes.rules.concurrency_limit). A key stored with 0
was locked out; so that this change widens no one's access, such keys are deactivated (what an
operator does to stop a key) and their limit emptied, each with an audit record saying why.
Going back leaves them deactivated.
"""

import django.core.validators
from django.db import migrations, models


def deactivate_keys_locked_out_by_zero(apps, schema_editor) -> None:
    ApiKey = apps.get_model("nodes", "ApiKey")
    ChangeRecord = apps.get_model("nodes", "ChangeRecord")
    for key in ApiKey.objects.filter(max_concurrent=0):
        changes = {"max_concurrent": [0, None]}
        if key.is_active:
            changes["is_active"] = [True, False]
        ApiKey.objects.filter(pk=key.pk).update(max_concurrent=None, is_active=False)
        ChangeRecord.objects.create(
            actor_label="migration 0007",
            via="system",
            action="update",
            object_type="apikey",
            object_id=str(key.pk),
            object_repr=key.name[:500],
            changes=changes,
            note="max_concurrent=0 now means no limit; the key it locked out is deactivated instead",
        )


class Migration(migrations.Migration):

    dependencies = [
        ('nodes', '0006_input_rules'),
    ]

    operations = [
        migrations.AlterField(
            model_name='apikey',
            name='max_concurrent',
            field=models.PositiveIntegerField(blank=True, help_text='Concurrent requests; empty or 0 = no limit (as on nodes).', null=True),
        ),
        migrations.AlterField(
            model_name='node',
            name='max_concurrency',
            field=models.PositiveIntegerField(default=0, help_text='Concurrent requests allowed; 0 = no limit (as on API keys).', validators=[django.core.validators.MaxValueValidator(1000000)]),
        ),
        migrations.RunPython(deactivate_keys_locked_out_by_zero, migrations.RunPython.noop),
    ]
