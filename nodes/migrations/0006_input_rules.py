"""One validation for every interface (nodes.validators, nodes.networks): the field validators, and
the node URLs already stored brought to their one spelling (localhost, 127.1, 2130706433 and
[::ffff:127.0.0.1] are 127.0.0.1; no default port). A node whose URL would become another node's
keeps its URL and is named in a warning: which of the two to keep is the operator's decision (the
admin names the other node when either is saved). Going back keeps the URLs as they are: the old
code reads them as it read any other.
"""

import logging

from django.core.exceptions import ValidationError
from django.db import migrations, models

import nodes.validators
from nodes.networks import normalize_node_url

logger = logging.getLogger("nodes.migrations")


def node_urls_in_one_spelling(apps, schema_editor) -> None:
    Node = apps.get_model("nodes", "Node")
    taken = dict(Node.objects.values_list("url", "pk"))
    for node in Node.objects.order_by("pk"):
        try:
            url = normalize_node_url(node.url)
        except ValidationError:
            logger.warning("node %s: its URL %r is not valid any more; edit it in the admin", node.pk, node.url)
            continue
        if url == node.url:
            continue
        if url in taken:
            logger.warning(
                "node %s (%s) is the same backend as node %s (%s); left as it is: remove one of them",
                node.pk,
                node.url,
                taken[url],
                url,
            )
            continue
        del taken[node.url]
        taken[url] = node.pk
        Node.objects.filter(pk=node.pk).update(url=url)


class Migration(migrations.Migration):

    dependencies = [
        ('nodes', '0005_control_plane_admission'),
    ]

    operations = [
        migrations.AlterField(
            model_name='apikey',
            name='name',
            field=models.CharField(max_length=100, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='controlplane',
            name='address',
            field=models.CharField(blank=True, help_text='NanoCtrl only: host:port of the NanoCtrl server, or its http(s):// URL.', max_length=255, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='controlplane',
            name='name',
            field=models.CharField(max_length=100, unique=True, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='controlplane',
            name='scope',
            field=models.CharField(blank=True, help_text='Registry scope; empty for the unscoped registry.', max_length=100, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='modelalias',
            name='name',
            field=models.CharField(help_text="What a client sends in the request's model field.", max_length=255, validators=[nodes.validators.validate_model_name]),
        ),
        migrations.AlterField(
            model_name='modelalias',
            name='served_name',
            field=models.CharField(help_text='The model name the node serves (sent upstream).', max_length=255, validators=[nodes.validators.validate_model_name]),
        ),
        migrations.AlterField(
            model_name='node',
            name='kv_connector_address',
            field=models.CharField(blank=True, help_text='vLLM KV connector host:port.', max_length=255, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='node',
            name='name',
            field=models.CharField(blank=True, help_text='Optional display name.', max_length=200, validators=[nodes.validators.validate_single_line]),
        ),
        migrations.AlterField(
            model_name='node',
            name='url',
            field=models.CharField(help_text='Base URL, e.g. http://10.0.0.5:8000, stored in one spelling (localhost, 127.1 and [::ffff:127.0.0.1] are 127.0.0.1; no default port, no trailing slash).', max_length=500, unique=True),
        ),
        migrations.AlterField(
            model_name='routepolicy',
            name='model',
            field=models.CharField(blank=True, help_text='Served model name; empty for the global default.', max_length=255, unique=True, validators=[nodes.validators.validate_model_name]),
        ),
        migrations.RunPython(node_urls_in_one_spelling, migrations.RunPython.noop),
    ]
