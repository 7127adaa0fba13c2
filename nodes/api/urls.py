from __future__ import annotations

from rest_framework.routers import DefaultRouter

from . import views
from .requests import RequestViewSet
from .usage import UsageViewSet

router = DefaultRouter()
router.register("nodes", views.NodeViewSet)
router.register("aliases", views.ModelAliasViewSet)
router.register("route-policies", views.RoutePolicyViewSet)
router.register("control-planes", views.ControlPlaneViewSet)
router.register("api-keys", views.ApiKeyViewSet)
router.register("changes", views.ChangeRecordViewSet)
router.register("requests", RequestViewSet, basename="request")
router.register("usage", UsageViewSet, basename="usage")

urlpatterns = router.urls
