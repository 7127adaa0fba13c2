"""Writes to the registry. Every interface (admin, REST API, DLRouter compat, registry sync, commands)
calls these functions, so each change is validated, audited and — when it affects routing — bumps
the configuration version exactly once, in one place (``config_version_bump``).

Each service is ``<entity>_<action>`` with keyword-only arguments and takes its object by a keyword
named after the entity (``node_save(node=..., actor=...)``). Callers import the package
(``from nodes import services; services.node_upsert(...)``); the modules group them:

- ``audit``          the actor, the audit trail, the configuration version
- ``nodes``          nodes and their served models
- ``routing``        model aliases and route policies
- ``api_keys``       the proxy's API keys
- ``control_planes`` control planes and their registration tokens
- ``registration``   engines registering themselves through a control plane's registration URL
- ``registry_sync``  the registry sync (lock, listing, state); ``registry_diff`` its diff and bulk writes
- ``health_checks``  probing nodes on request ("probe now", registration)
- ``usage``          rolling the web workers' per-minute usage up into hourly rows
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .api_keys import api_key_create, api_key_delete, api_key_record_usage, api_key_save, api_key_update
from .audit import OPERATOR_INTERFACES, Actor, config_version_bump, config_version_current
from .concurrency import StaleWrite, check_version, locked_row, row_version
from .control_planes import (
    control_plane_create,
    control_plane_delete,
    control_plane_issue_token,
    control_plane_revoke_token,
    control_plane_save,
    control_plane_update,
)
from .health_checks import HEALTH_ACTOR, HealthReport, health_check_nodes
from .nodes import (
    NodeAction,
    node_approve,
    node_create,
    node_delete,
    node_disable,
    node_drain,
    node_enable,
    node_save,
    node_set_models,
    node_set_state,
    node_update,
    node_upsert,
)
from .registration import RegistrationConflict, node_register, node_unregister
from .registry_sync import (
    SYNC_LOCK_TIMEOUT,
    SyncResult,
    registry_apply_entity,
    registry_mark_gone,
    registry_sync,
)
from .routing import (
    alias_create,
    alias_delete,
    alias_save,
    alias_update,
    policy_create,
    policy_delete,
    policy_save,
    policy_update,
)
from .usage import usage_prune, usage_rollup


def entity_service(entity: str, action: str) -> Callable[..., Any]:
    """The service ``<entity>_<action>``: ``entity_service("policy", "delete")`` is ``policy_delete``.

    For the interfaces that treat every entity alike (the admin's saves and deletes, the REST API's
    creates, updates and deletes); each such service takes its object by the keyword ``entity``.
    """
    service = globals().get(f"{entity}_{action}")
    if not callable(service):
        raise LookupError(f"there is no service {entity}_{action}")
    return service


__all__ = [
    "HEALTH_ACTOR",
    "OPERATOR_INTERFACES",
    "SYNC_LOCK_TIMEOUT",
    "Actor",
    "HealthReport",
    "NodeAction",
    "RegistrationConflict",
    "StaleWrite",
    "SyncResult",
    "alias_create",
    "alias_delete",
    "alias_save",
    "alias_update",
    "api_key_create",
    "api_key_delete",
    "api_key_record_usage",
    "api_key_save",
    "api_key_update",
    "check_version",
    "config_version_bump",
    "config_version_current",
    "control_plane_create",
    "control_plane_delete",
    "control_plane_issue_token",
    "control_plane_revoke_token",
    "control_plane_save",
    "control_plane_update",
    "entity_service",
    "health_check_nodes",
    "locked_row",
    "node_approve",
    "node_create",
    "node_delete",
    "node_disable",
    "node_drain",
    "node_enable",
    "node_register",
    "node_save",
    "node_set_models",
    "node_set_state",
    "node_unregister",
    "node_update",
    "node_upsert",
    "policy_create",
    "policy_delete",
    "policy_save",
    "policy_update",
    "registry_apply_entity",
    "registry_mark_gone",
    "registry_sync",
    "row_version",
    "usage_prune",
    "usage_rollup",
]
