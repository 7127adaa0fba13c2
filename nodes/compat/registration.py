"""A control plane's registration URL: ``/register/<token>/nodes/add``, ``/nodes/remove`` and
``/nodes/status``, DLRouter's bodies with the credential in the path.

Engines that register themselves with no way to send a header (LMDeploy's ``api_server
--proxy-url URL`` posts to ``URL/nodes/add`` with no credentials) are started with
``--proxy-url http://routerpanel:8000/register/<token>``. The token names the control plane whose
rules apply: its allow-list (403, nothing stored), its approval mode (a new node waits as
``pending``), its engine type as the last resort when the engine's own endpoints do not tell.
An unknown token is a 404 like any unknown URL, and says nothing more.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from nodes import admission, services
from nodes.choices import NodeState
from nodes.models import ControlPlane, Node
from nodes.networks import is_unspecified, url_host, with_host

from .views import CompatView, compat_error, dlrouter_status, parse_registration, peer_address, resolve_engine


class RegistrationView(CompatView):
    """Base: the token in the path is the only credential (no session, no header)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    def registering_control_plane(self) -> ControlPlane:
        plane = admission.control_plane_for_token(self.kwargs.get("token") or "")
        if plane is None:
            raise compat_error("Not found.", 404)  # the same answer as any unknown URL
        if not plane.enabled:
            raise compat_error(f"Registration through control plane {plane.name!r} is disabled.", 403)
        return plane


class RegisterAddView(RegistrationView):
    @extend_schema(
        summary="An engine registers itself (DLRouter/LMDeploy format) through a control plane's registration URL",
        request=dict,
        responses=dict,
    )
    def post(self, request: Request, token: str) -> Response:
        plane = self.registering_control_plane()
        registration = parse_registration(self)
        peer = peer_address(request)
        try:
            # Before the engine is asked anything: an address outside is never contacted.
            admission.check_allowed(plane, url=registration.url, peer=peer)
        except admission.AdmissionRefused as exc:
            raise compat_error(f"Registration refused: {exc}", 403) from None
        engine_type, models, choice = resolve_engine(registration, fallback=plane.engine_type)
        try:
            node, _ = services.node_register(
                control_plane=plane,
                url=registration.url,
                role=registration.role,
                engine_type=engine_type,
                models=models,
                peer=peer,
                detection=choice,
                speed=registration.speed,
            )
        except admission.AdmissionRefused as exc:
            raise compat_error(f"Registration refused: {exc}", 403) from None
        except services.RegistrationConflict as exc:
            raise compat_error(f"Failed to add node: {exc}", 409) from None
        except DjangoValidationError as exc:
            raise compat_error(f"Failed to add node: {' '.join(exc.messages)}", 400) from None
        if settings.ROUTERPANEL_HEALTH_PROBE_ON_REGISTER:
            # It takes traffic after its first good probe (once approved, when pending): probe it now.
            services.health_check_nodes(node_ids=[node.pk])
        if node.state == NodeState.PENDING:
            return Response({"message": "Added successfully; waiting for an operator's approval.", "state": node.state})
        return Response({"message": "Added successfully.", "state": node.state})


class RegisterRemoveView(RegistrationView):
    @extend_schema(summary="An engine removes the node it registered through this URL", request=dict, responses=dict)
    def post(self, request: Request, token: str) -> Response:
        plane = self.registering_control_plane()
        url = self.normalized_url(self.json_body())
        peer = peer_address(request)
        if is_unspecified(url_host(url)) and peer is not None:
            url = with_host(url, peer)
        if not services.node_unregister(control_plane=plane, url=url):
            raise compat_error(f"Node {url} is not registered.", 404)
        return Response({"message": "Removed successfully."})


class RegisterStatusView(RegistrationView):
    @extend_schema(summary="The nodes registered through this control plane, keyed by URL", responses=dict)
    def get(self, request: Request, token: str) -> Response:
        plane = self.registering_control_plane()
        nodes = Node.objects.filter(control_plane=plane).exclude(state=NodeState.GONE).prefetch_related("aliases")
        return Response({node.url: dlrouter_status(node) for node in nodes})
