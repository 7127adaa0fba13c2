"""Seed the configuration version row and the global default route policy."""

from django.db import migrations


def seed(apps, schema_editor):
    apps.get_model("nodes", "ConfigVersion").objects.get_or_create(pk=1, defaults={"version": 1})
    apps.get_model("nodes", "RoutePolicy").objects.get_or_create(model="")


class Migration(migrations.Migration):
    dependencies = [("nodes", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
