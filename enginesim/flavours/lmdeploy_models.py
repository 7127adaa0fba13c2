"""LMDeploy's DistServe request models as ``enginesim.schema`` models (lmdeploy 0.18:
``lmdeploy/pytorch/disagg/config.py`` and ``lmdeploy/pytorch/disagg/conn/protocol.py``).

Enums are plain ``enum.Enum`` with ``auto()`` values, so they are validated by value: integers.
``tests/realengines/test_lmdeploy_models.py`` gives these and LMDeploy's own models the same bodies and
expects the same verdicts.
"""

from __future__ import annotations

from enginesim.schema import Enum, Field, ListOf, Model, Optional

MIGRATION_PROTOCOL = Enum((1, 2, 3))  # TCP, RDMA, NVLINK
RDMA = 2
CONNECTION_STATUS_SUCCESS = 1
RDMA_LINK_TYPE = Enum((1, 2))  # IB, RoCE

ENGINE_CONFIG: Model = {
    "tp_size": Field("int"),
    "ep_size": Field("int"),
    "dp_size": Field("int"),
    "pp_size": Field(Optional("int")),  # Optional, yet required: it has no default
    "dp_rank": Field("int"),
    "block_size": Field("int"),
    "num_cpu_blocks": Field("int"),
    "num_gpu_blocks": Field("int"),
}

RDMA_CONFIG: Model = {
    "with_gdr": Field("bool", required=False, default=True),
    "link_type": Field(RDMA_LINK_TYPE, required=False, default=2),
}

INIT_REQUEST: Model = {
    "local_engine_id": Field("str"),
    "local_engine_config": Field(ENGINE_CONFIG),
    "remote_engine_id": Field("str"),
    "remote_engine_config": Field(ENGINE_CONFIG),
    "protocol": Field(MIGRATION_PROTOCOL),
    "rank": Field(Optional("int"), required=False),
    "tcp_config": Field(Optional({}), required=False),
    "rdma_config": Field(Optional(RDMA_CONFIG), required=False),
    "nvlink_config": Field(Optional({}), required=False),
}

ENGINE_ENDPOINT_INFO: Model = {"zmq_address": Field("str")}

CACHE_POOL_INFO: Model = {
    "shape": Field(ListOf("int")),
    "dtype": Field("str"),
    "element_size": Field("int"),
    "entry_axis": Field("int"),
}

KV_TRANSFER_ENDPOINT_INFO: Model = {
    "protocol": Field(MIGRATION_PROTOCOL),
    "endpoint_info": Field("str"),
    "cache_pools": Field(Optional(ListOf(CACHE_POOL_INFO)), required=False),
}

CONNECT_REQUEST: Model = {
    "protocol": Field(MIGRATION_PROTOCOL),
    "remote_engine_id": Field("str"),
    "remote_engine_endpoint_info": Field(ENGINE_ENDPOINT_INFO),
    "remote_kvtransfer_endpoint_info": Field(ListOf(KV_TRANSFER_ENDPOINT_INFO)),
}

MIGRATION_REQUEST: Model = {
    "protocol": Field(MIGRATION_PROTOCOL),
    "remote_engine_id": Field("str"),
    "remote_session_id": Field("int"),
    "remote_token_id": Field("int"),
    "remote_block_ids": Field(ListOf("int")),
    "is_dummy_prefill": Field("bool", required=False, default=False),
}

CACHE_FREE_REQUEST: Model = {
    "remote_engine_id": Field("str"),
    "remote_session_id": Field("int"),
}

DROP_CONNECTION_REQUEST: Model = {
    "engine_id": Field("str"),
    "remote_engine_id": Field("str"),
}

# What a test may ask this module and LMDeploy's package about, by LMDeploy's class name.
MODELS: dict[str, Model] = {
    "DistServeEngineConfig": ENGINE_CONFIG,
    "DistServeInitRequest": INIT_REQUEST,
    "DistServeConnectionRequest": CONNECT_REQUEST,
    "MigrationRequest": MIGRATION_REQUEST,
    "DistServeCacheFreeRequest": CACHE_FREE_REQUEST,
    "DistServeDropConnectionRequest": DROP_CONNECTION_REQUEST,
}
