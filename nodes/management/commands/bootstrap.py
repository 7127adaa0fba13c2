"""Create the demo/automation credentials: the ``admin`` superuser, a REST API token and a proxy key.

Values come from ``ROUTERPANEL_ADMIN_PASSWORD``, ``ROUTERPANEL_API_TOKEN`` and
``ROUTERPANEL_DEMO_API_KEY`` when set; otherwise they are generated and printed once, on the run
that creates them (only a hash of the proxy key is kept, so it cannot be shown again).
"""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token

from nodes.models import ApiKey, ControlPlane, hash_api_key
from nodes.services import Actor, api_key_create, control_plane_create, control_plane_update

DEMO_KEY_NAME = "demo"
DEMO_CONTROL_PLANE = "local"


class Command(BaseCommand):
    help = "Create the admin user, its REST API token and a demo proxy API key (printed once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="Where the web server listens.")
        parser.add_argument(
            "--control-plane", default="", help="NanoCtrl host:port to register as control plane 'local'."
        )
        parser.add_argument("--control-plane-redis", default="", help="That NanoCtrl's Redis URL (its change events).")
        parser.add_argument("--sync-interval", type=int, default=5)

    @transaction.atomic
    def handle(
        self,
        *args: object,
        username: str,
        url: str,
        control_plane: str,
        control_plane_redis: str,
        sync_interval: int,
        **options: object,
    ) -> None:
        actor = Actor.system("bootstrap")
        lines: list[str] = []

        user_model = get_user_model()
        password = os.environ.get("ROUTERPANEL_ADMIN_PASSWORD", "")
        user = user_model.objects.filter(username=username).first()
        if user is None:
            password = password or secrets.token_urlsafe(12)
            user = user_model.objects.create_superuser(username=username, email="", password=password)
            lines.append(f"  admin login     {url}/admin/  user {username!r}  password {password!r}")
        elif password:
            user.set_password(password)
            user.save(update_fields=["password"])
            lines.append(f"  admin login     {url}/admin/  user {username!r}  password from ROUTERPANEL_ADMIN_PASSWORD")
        else:
            lines.append(
                f"  admin login     {url}/admin/  user {username!r}  (password printed when it was created;"
                f" reset: manage.py changepassword {username})"
            )

        wanted_token = os.environ.get("ROUTERPANEL_API_TOKEN", "")
        token = Token.objects.filter(user=user).first()
        if token is None or (wanted_token and token.key != wanted_token):
            if token is not None:
                token.delete()
            token = Token.objects.create(user=user, key=wanted_token or Token.generate_key())
            lines.append(f"  REST API token  {token.key}  (Authorization: Bearer …)")
        else:
            lines.append(f"  REST API token  {token.key}")

        wanted_key = os.environ.get("ROUTERPANEL_DEMO_API_KEY", "")
        if wanted_key:
            if not ApiKey.objects.filter(key_hash=hash_api_key(wanted_key)).exists():
                ApiKey.objects.filter(name=DEMO_KEY_NAME).delete()
                api_key_create(actor=actor, name=DEMO_KEY_NAME, plaintext=wanted_key)
            lines.append("  proxy API key   from ROUTERPANEL_DEMO_API_KEY  (for /v1, Authorization: Bearer …)")
        elif not ApiKey.objects.filter(name=DEMO_KEY_NAME).exists():
            _, plaintext = api_key_create(actor=actor, name=DEMO_KEY_NAME)
            lines.append(f"  proxy API key   {plaintext}  (for /v1; shown once)")
        else:
            lines.append("  proxy API key   'demo' exists (shown when it was created; add another in the admin)")

        if control_plane:
            fields = {
                "address": control_plane,
                "redis_url": control_plane_redis,
                "sync_interval": sync_interval,
                "enabled": True,
            }
            existing = ControlPlane.objects.filter(name=DEMO_CONTROL_PLANE).first()
            if existing is None:
                control_plane_create(actor=actor, name=DEMO_CONTROL_PLANE, **fields)
            else:
                control_plane_update(control_plane=existing, actor=actor, **fields)
            lines.append(f"  control plane   {DEMO_CONTROL_PLANE!r}: NanoCtrl at {control_plane}")

        bar = "=" * 78
        self.stdout.write("\n".join([bar, "RouterPanel credentials", *lines, bar]))
