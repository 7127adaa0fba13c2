"""URL configuration: admin, the live dashboard, REST API with its OpenAPI schema, DLRouter's ``/nodes/*``,
and the control planes' registration URLs (``/register/<token>/nodes/*``)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from nodes.compat.urls import register_urlpatterns

admin.site.site_header = "RouterPanel"
admin.site.site_title = "RouterPanel"
admin.site.index_title = "Fleet administration"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("dashboard.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # Swagger UI from our static files (drf-spectacular-sidecar), its start-up script served as a
    # file too (the split view): the Content-Security-Policy allows no inline script.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/", include("nodes.api.urls")),
    path("nodes/", include("nodes.compat.urls")),
    path("register/<str:token>/nodes/", include(register_urlpatterns)),
]

handler404 = "nodes.api.exceptions.not_found"
handler500 = "nodes.api.exceptions.server_error"
