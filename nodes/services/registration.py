"""Engines registering themselves through a control plane's registration URL
(``/register/<token>/nodes/add``, see ``nodes.compat.registration``): LMDeploy's
``api_server --proxy-url``, or any DLRouter-style engine, with no change to the engine.

The control plane's allow-list is checked (``nodes.admission``), a new node starts ``pending`` when
its approval mode is manual, and an engine that registers again (it restarted) updates its own
node: role, engine type and models, except what an operator changed by hand. It never takes over a
node that someone else added.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import transaction

from .. import admission
from ..choices import ChangeVia, NodeSource
from ..engine_detect import EngineTypeChoice, with_detection
from ..models import ControlPlane, Node
from ..networks import normalize_node_url
from .audit import Actor
from .nodes import node_create, node_delete, node_set_models, node_update


class RegistrationConflict(Exception):
    """The URL belongs to a node that this control plane's registrations did not create."""


def registration_actor(control_plane: ControlPlane) -> Actor:
    return Actor(label=f"registration:{control_plane.name}"[:200], via=ChangeVia.REGISTER)


def node_register(
    *,
    control_plane: ControlPlane,
    url: str,
    role: str,
    engine_type: str,
    models: Iterable[str],
    peer: str | None,
    detection: EngineTypeChoice | None = None,
    speed: float | None = None,
) -> tuple[Node, bool]:
    """Create or update the node an engine registers at ``url``; returns ``(node, created)``.

    ``detection`` records how ``engine_type`` was found (``None``: the engine gave it); ``speed``
    is DLRouter's optional figure, kept in the metadata. Raises ``admission.AdmissionRefused``
    (outside the allowed networks: nothing is stored), ``RegistrationConflict`` or Django's
    ``ValidationError``.
    """
    url = normalize_node_url(url)
    admission.check_allowed(control_plane, url=url, peer=peer)
    actor = registration_actor(control_plane)
    models = list(models)
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(url=url).first()
        if node is None:
            created = node_create(
                actor=actor,
                url=url,
                models=models,
                source=NodeSource.ENGINE,
                control_plane=control_plane,
                state=admission.initial_state(control_plane),
                role=role,
                engine_type=engine_type,
                metadata=_metadata({}, detection=detection, speed=speed),
                note=f"registered from {peer or 'an unknown address'}",
            )
            return created, True
        if node.source != NodeSource.ENGINE or node.control_plane_id != control_plane.pk:
            owner = f"control plane {node.control_plane}" if node.control_plane_id else "an operator"
            raise RegistrationConflict(f"{url} is already a node of {owner} ({node.get_source_display()}).")
        kept = set(node.operator_fields or [])
        wanted = {"role": role, "engine_type": engine_type}
        changes: dict[str, Any] = {k: v for k, v in wanted.items() if k not in kept and getattr(node, k) != v}
        merged = _metadata(node.metadata, detection=detection, speed=speed)
        if "metadata" not in kept and merged != node.metadata:
            changes["metadata"] = merged
        if changes:
            node_update(node=node, actor=actor, note="registered again", **changes)
        if "aliases" not in kept:
            node_set_models(node=node, actor=actor, models=models)
        return node, False


def _metadata(base: dict[str, Any], *, detection: EngineTypeChoice | None, speed: float | None) -> dict[str, Any]:
    updated = with_detection(base, detection)
    if speed is not None:
        updated["speed"] = speed
    return updated


def node_unregister(*, control_plane: ControlPlane, url: str) -> bool:
    """Forget the node an engine registered at ``url`` through ``control_plane``; ``False`` when
    there is none (a node someone else added is never removed this way)."""
    node = Node.objects.filter(
        url=normalize_node_url(url), source=NodeSource.ENGINE, control_plane=control_plane
    ).first()
    if node is None:
        return False
    node_delete(node=node, actor=registration_actor(control_plane), note="removed through the registration URL")
    return True
