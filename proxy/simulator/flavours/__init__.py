"""Engine families: each flavour adds its PD protocol and endpoints to the common OpenAI engine."""

from __future__ import annotations

from proxy.simulator.flavours.base import Flavour
from proxy.simulator.flavours.lmdeploy import LmdeployFlavour
from proxy.simulator.flavours.nanodeploy import NanoDeployFlavour
from proxy.simulator.flavours.sglang import SglangFlavour
from proxy.simulator.flavours.vllm import VllmFlavour

FLAVOURS: dict[str, type[Flavour]] = {
    "openai": Flavour,
    "nanodeploy": NanoDeployFlavour,
    "dlengine": NanoDeployFlavour,
    "vllm": VllmFlavour,
    "sglang": SglangFlavour,
    "lmdeploy": LmdeployFlavour,
}


def flavour_for(engine: str) -> type[Flavour]:
    return FLAVOURS[engine]
