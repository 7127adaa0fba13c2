"""Engine families: each flavour adds its PD protocol and endpoints to the common OpenAI engine."""

from __future__ import annotations

from enginesim.flavours.base import Flavour
from enginesim.flavours.lmdeploy import LmdeployFlavour
from enginesim.flavours.nanodeploy import NanoDeployFlavour
from enginesim.flavours.sglang import SglangFlavour
from enginesim.flavours.vllm import VllmFlavour

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
